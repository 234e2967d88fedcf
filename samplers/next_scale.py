"""Next-scale decoding (VAR, arXiv 2404.02905) as plain logic: which tokens each forward feeds, how
guidance ramps over the scales, and how a scale's logits become its codes. No model, no engine; the
vLLM scheduler and runner read it, and the plain-PyTorch reference loop
(`model_executors/var_reference.py`) draws with the same `sample_scale`.

One forward per scale (`models/var.py::VAR.autoregressive_infer_cfg`): forward k feeds all pn_k^2
input tokens of scale k (forward 0 feeds the class token) and samples all pn_k^2 codes of scale k
from their own logits. In vLLM's terms a request is the class-token prompt plus L = sum pn_k^2
output codes; forward k (k >= 1) feeds the last code of scale k-1 plus pn_k^2 - 1 extra slots
(vLLM's speculative-token slots, which the runner fills and never rejects), so vLLM's own
accounting places scale k's inputs at KV positions [ends[k-1], ends[k]): VAR's flat positions.

Guidance (VAR's `cfg`, `guide`): at scale k the logits are (1 + t) cond - t uncond, t = cfg * k / (K - 1)
(LlamaGen's `uncond + s (cond - uncond)` with s = 1 + t, computed in VAR's form so the engine and the
reference agree to the last bit); cfg = 0 is unguided (VAR computes the uncond stream anyway; its
weight is 0 at every scale, so it is dropped here).

Sampling (`sample_scale`): top-k, then top-p, on the guided logits, then the temperature (CoDe's
`models/helpers.py::sample_with_top_k_top_p_` divides the already-filtered logits), then one draw per
position by the exponential race (argmax p / E, E ~ Exp(1): token i with probability p_i), the rows
of a scale in row-major order, from the image's own generator. VAR draws one multinomial over the
whole batch from one generator, so its draws depend on the batch; here an image's draws depend on
its seed only. Settings may differ per scale (CoDe: top-k 600 and temperature 1.1 on the first
seven scales, 1.0 after).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from vllm_visual_ar.model_executors.var_config import DRAFTER, REFINER
from vllm_visual_ar.model_executors.var_vq import scale_ends
from vllm_visual_ar.samplers.strategy import Footprint, Strategy, StrategyRunner


@dataclass(frozen=True)
class ScaleSchedule:
    patch_nums: tuple[int, ...]

    @cached_property
    def ends(self) -> tuple[int, ...]:
        """Cumulative token counts: scale k holds flat positions [ends[k-1], ends[k])."""
        return tuple(scale_ends(self.patch_nums))

    @property
    def num_scales(self) -> int:
        return len(self.patch_nums)

    @property
    def num_tokens(self) -> int:
        return self.ends[-1]

    def tokens(self, k: int) -> int:
        return self.patch_nums[k] ** 2

    def start(self, k: int) -> int:
        return self.ends[k - 1] if k > 0 else 0

    def scale_of(self, position: int) -> int:
        """The scale that flat position `position` belongs to."""
        return bisect.bisect_right(self.ends, position)

    @property
    def widest_step(self) -> int:
        return max(self.tokens(k) for k in range(self.num_scales))


@lru_cache(maxsize=16)
def scale_schedule(patch_nums: tuple[int, ...]) -> ScaleSchedule:
    return ScaleSchedule(tuple(patch_nums))


def guide(cond: torch.Tensor, uncond: torch.Tensor, cfg: float, k: int, num_scales: int) -> torch.Tensor:
    """VAR's guidance at scale k, in its own form: (1 + t) cond - t uncond, t = cfg * k / (K - 1)."""
    t = cfg * k / (num_scales - 1) if num_scales > 1 else 0.0
    return (1 + t) * cond - t * uncond


def sample_scale(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Guided logits [n, V] of one scale of one image -> codes [n]. top_k 0 and top_p 1 are off;
    temperature 0 or top_k 1 is greedy. The race is drawn even then, so an image's generator advances
    by one [n, V] draw per scale whatever its settings."""
    x = logits.float()
    race = torch.empty_like(x).exponential_(generator=generator)
    if temperature == 0 or top_k == 1:
        return x.argmax(dim=-1)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:  # VAR keeps every logit >= the k-th largest
        x = x.masked_fill(x < x.topk(top_k, dim=-1).values[:, -1:], float("-inf"))
    if top_p < 1:  # VAR drops the smallest tokens whose cumulative mass is <= 1 - top_p; the top one stays
        ascending, order = x.sort(dim=-1)
        drop = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        drop[:, -1] = False
        x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return (x / temperature).softmax(dim=-1).div(race).argmax(dim=-1)


# -- the strategy: what vLLM's scheduler and the plugin's runner ask of next-scale decoding -------------
#
# Every request to a model whose config.decoding is "next_scale" runs under `NextScale`: strategy
# "raster" (the default) is VAR's plain scale order, "code" CoDe's hand-off. In vLLM's terms a request
# is the class-token prompt plus the image's L codes; before forward k the scheduler half gives it
# pn_k^2 - 1 speculative-token slots, which the runner half fills and never rejects, so vLLM's own
# accounting places scale k at positions [ends[k-1], ends[k]) and frees it when the image ends.
#
# CoDe (arXiv 2411.17787, czg1225/CoDe `models/var.py::autoregressive_infer_cfg_draft` / `_refine`): a
# folder may carry a refiner beside its VAR (the drafter). A request with strategy "code" and
# draft_steps N is decoded by the drafter for scales 0..N-1; at the hand-off the scheduler rewinds the
# request's KV length to 0, so vLLM feeds positions [0, ends[N]) again in one forward, which the
# refiner computes with the block-causal mask, writing its own layers' keys and values for those
# positions, and samples scale N from its last pn_N^2 rows; the refiner then decodes scales N+1..K-1
# one forward each. The two models' layers keep their KV in separate groups of vLLM's block pool,
# and a request holds blocks only in its phase's groups (`vllm_visual_ar/phase_kv.py`): the
# drafter's blocks go back to the pool at the hand-off, the refiner's are taken then. The two models have different weights, so a forward
# runs one of them: requests are in the drafter or the refiner phase, and the scheduler alternates
# between the phases that have work (`phase`).

def draft_steps(decoding, num_scales: int) -> int:
    """Scales the drafter decodes: N for strategy "code", every scale otherwise."""
    return decoding.draft_steps if decoding is not None and decoding.strategy == "code" else num_scales


@dataclass
class _Image:
    """One image's VQ state on the runner (shared by its two guidance streams)."""
    scales: int = 0                 # scales accumulated into f_hat
    f_hat: torch.Tensor | None = None
    inputs: dict = None             # scale -> its input features [pn^2, z], computed once

    def __post_init__(self):
        self.inputs = {}


class NextScaleRunner(StrategyRunner):
    """Runner half, for whole batches (every request of the model is next-scale).

    `prepare_batch` runs after vLLM has laid out the batch: each request feeds the positions up to
    the end of the scale it samples (one scale; its prompt is scale 0; at a CoDe hand-off every scale
    up to N); it hands the model the next-scale features and class labels of every token, the model
    to run (drafter or refiner: one per forward), the block-causal mask for multi-scale forwards, and
    asks for logits at the sampled scale's rows. `sample_batch` mixes each guided pair's logits with
    the ramped guidance scale and draws the scale's codes from the cond (or single) stream's
    generator; both streams get them."""

    owns_batch = True

    def __init__(self, *args):
        super().__init__(*args)
        self.quantizer = self.model.quantize
        self.schedule = scale_schedule(tuple(self.config.patch_nums))
        self.images: dict[str, _Image] = {}
        self.rows: list = []

    def _inputs(self, key: str, k: int, codes: list[int], device) -> torch.Tensor:
        """Input features of scale k (k >= 1) of an image whose codes so far are `codes`."""
        image = self.images.setdefault(key, _Image())
        if k not in image.inputs:
            if image.scales > k:  # not a scale after the last one seen: rebuild
                image.scales, image.f_hat, image.inputs = 0, None, {}
            with torch.no_grad():
                for s in range(image.scales, k):
                    scale_codes = torch.tensor(codes[self.schedule.start(s):self.schedule.ends[s]], device=device)
                    image.f_hat = self.quantizer.add_scale(s, image.f_hat, scale_codes[None])
                    image.inputs[s + 1] = self.quantizer.next_input(s, image.f_hat)[0]
                image.scales = k
        return image.inputs[k]

    def prepare_batch(self, step):
        from vllm_visual_ar.model_executors.var import VARStepInputs

        total = int(step.query_start[-1])
        weight = self.quantizer.embedding.weight
        features = torch.zeros(total, weight.shape[1], device=step.device, dtype=weight.dtype)
        labels = torch.empty(total, dtype=torch.long)
        self.rows, prefixes, phases, indices = [], [], set(), []
        for row, req_id in enumerate(step.req_ids):
            state, info = step.state(row), step.info(row)
            start, end = step.fed(row)
            first = int(step.computed[row])
            k = self.schedule.ends.index(first + end - start) if first + end - start in self.schedule.ends else None
            if k is None or first > self.schedule.start(k):
                raise RuntimeError(f"next-scale request {req_id}: scheduled positions [{first}, {first + end - start}), "
                                   f"which end no scale of {self.schedule.patch_nums}")
            decoding = info.decoding if info is not None else None
            phases.add(REFINER if k >= draft_steps(decoding, self.schedule.num_scales) else DRAFTER)
            labels[start:end] = state.prompt_token_ids[0] - self.config.codebook_size
            key = info.image_id if info is not None else req_id
            for s in range(max(1, self.schedule.scale_of(first)), k + 1):  # every scale fed (scale 0: the class token)
                at = start + self.schedule.start(s) - first
                features[at:at + self.schedule.tokens(s)] = self._inputs(key, s, state.output_token_ids, step.device)
            if first < self.schedule.start(k):  # several scales at once: block-causal inside the chunk
                prefixes.append((row, k))
            sampled = slice(end - self.schedule.tokens(k), end)
            self.rows.append((row, info, k, slice(len(indices), len(indices) + sampled.stop - sampled.start)))
            indices += range(sampled.start, sampled.stop)
        if len(phases) > 1:
            raise RuntimeError("a forward carries both CoDe phases; the scheduler runs one model per step")
        masked = None
        if prefixes:
            scale_of = np.repeat(np.arange(self.schedule.num_scales), [p * p for p in self.schedule.patch_nums])
            masked = step.masked_attention([(row, lambda q, kv: scale_of[kv][None, :] <= scale_of[q][:, None])
                                            for row, _ in prefixes])
        self.model.masked_attention = masked
        self.model.step_inputs = VARStepInputs(features, labels.to(step.device), refiner=phases == {REFINER})
        return np.asarray(indices), max(r.stop - r.start for *_, r in self.rows)

    def forget(self, req_id, info):
        self.images.pop(info.image_id if info is not None else req_id, None)

    def sample_batch(self, step, logits):
        """-> each request's codes of the scale it sampled (padding -1)."""
        v = self.layout.codebook_size
        images: dict[str, dict[str, tuple]] = {}
        for row, info, k, rows in self.rows:
            key = info.image_id if info is not None else step.req_ids[row]
            images.setdefault(key, {})[info.role if info is not None else "single"] = (row, info, k, rows)
        width = max(r.stop - r.start for *_, r in self.rows)
        out = torch.full((len(self.rows), width), -1, dtype=torch.int32)
        for streams in images.values():
            lead_row, info, k, rows = streams.get("cond") or streams["single"]
            x = logits[rows, :v]
            if "uncond" in streams:
                x = guide(x, logits[streams["uncond"][3], :v], info.guidance_scale, k, self.schedule.num_scales)
            params = step.state(lead_row).sampling_params
            settings = [max(params.top_k or 0, 0), params.top_p, params.temperature]
            if info is not None and info.scale_sampling:
                settings = [info.setting(name, k, value) for name, value in zip(("top_k", "top_p", "temperature"), settings)]
            codes = sample_scale(x, *settings, step.generator(lead_row))
            for row, _, _, rows in streams.values():
                out[row, : rows.stop - rows.start] = codes.to(torch.int32).cpu()
        return out


class NextScale(Strategy):
    """Scheduler half for one request: what it must look like, what one stream reserves, its phase
    and the slots of its next forward."""

    fields = ("draft_steps",)
    order = "next_scale"
    runner = NextScaleRunner
    uses_spec_slots = True
    entry_phase = DRAFTER  # a new request's first forward (the class token) runs the drafter

    @classmethod
    def checked(cls, decoding):
        from vllm_visual_ar.requests import short

        n = decoding.draft_steps
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"draft_steps must be an integer >= 1 (CoDe: scales the drafter decodes), got {short(n)}")
        return {}

    @classmethod
    def fitted(cls, decoding, config, size=None):
        """CoDe without draft_steps: the folder's `default_draft_steps` (the N a fine-tuned pair was
        trained for), if it names one."""
        default = getattr(config, "default_draft_steps", None)
        if decoding.strategy == "code" and decoding.draft_steps is None and default is not None:
            from dataclasses import replace

            return replace(decoding, draft_steps=default)
        return decoding

    @classmethod
    def budget_decodings(cls, config):
        """The CoDe hand-off at the last scale feeds the most tokens in one forward."""
        from vllm_visual_ar.requests import Decoding

        if getattr(config, "refiner", None) is None:
            return [Decoding()]
        return [Decoding(), Decoding("code", draft_steps=config.num_scales - 1)]

    @classmethod
    def problem(cls, config, decoding):
        if getattr(config, "decoding", None) != cls.order:
            return f"strategy {decoding.strategy!r} (draft_steps) applies to VAR models with a refiner"
        if decoding.strategy == "code":
            if getattr(config, "refiner", None) is None:
                return "strategy 'code' (draft_steps) needs a CoDe model folder: this VAR has no refiner"
            if decoding.draft_steps is None:
                return "strategy 'code' needs draft_steps (this model folder names no default_draft_steps)"
            if not 1 <= decoding.draft_steps <= config.num_scales - 1:
                return f"draft_steps must be in [1, {config.num_scales - 1}], got {decoding.draft_steps}"
        elif decoding.strategy != "raster":
            return f"strategy {decoding.strategy!r} does not apply: this model decodes scale by scale"
        if decoding.coupled:
            return "coupled draws apply to token-by-token models: this model decodes scale by scale"
        return None

    def __init__(self, config, decoding, size=None):
        super().__init__(config, decoding, size)
        self.schedule = scale_schedule(tuple(config.patch_nums))
        self.draft_steps = draft_steps(decoding, self.schedule.num_scales)

    def start(self, request):
        if request.num_prompt_tokens != 1:
            return "a next-scale (VAR) request's prompt is its one class token"
        if request.max_tokens != self.schedule.num_tokens:
            return f"a next-scale (VAR) image has {self.schedule.num_tokens} tokens: max_tokens must be that"
        if request.sampling_params.logprobs is not None:
            return "next-scale (VAR) decoding does not return logprobs"
        return None

    def scale_sampling_problem(self, scale_sampling):
        from vllm_visual_ar.requests import per_scale_problem

        return per_scale_problem(scale_sampling, self.schedule.num_scales)

    def footprint(self, output_tokens):
        """The CoDe hand-off feeds every position up to the end of scale N at once. KV per phase:
        the drafter's last forward writes up to the end of scale N-1, the refiner up to the end."""
        widest = self.schedule.widest_step
        everything = 1 + self.schedule.num_tokens  # the class token and every code
        phase_tokens = {DRAFTER: everything}
        if self.draft_steps < self.schedule.num_scales:
            widest = max(widest, self.schedule.ends[self.draft_steps])
            phase_tokens = {DRAFTER: 1 + self.schedule.ends[self.draft_steps - 1], REFINER: everything}
        return Footprint(self.schedule.num_tokens, widest, 0, phase_tokens)

    def next_scale(self, request) -> int:
        """The scale the request's next forward samples (its codes so far end the scale before)."""
        done = request.num_output_tokens
        return 0 if done == 0 else self.schedule.ends.index(done) + 1

    def phase(self, request):
        return REFINER if self.next_scale(request) >= self.draft_steps else DRAFTER

    def before_step(self, request):
        """The spec-token slots the forward needs, and at the CoDe hand-off the rewind that makes
        vLLM feed the whole prefix to the refiner."""
        if request.num_output_tokens == 0:
            request.spec_token_ids = []
            return
        k = self.next_scale(request)
        if k == self.draft_steps and request.num_computed_tokens:
            request.num_computed_tokens = 0  # the refiner recomputes scales 0..k-1 with scale k
        # vLLM feeds (tokens so far + slots - computed) tokens: the last code plus pn_k^2 - 1 slots, or
        # after the rewind the whole prefix up to the end of scale k.
        request.spec_token_ids = [0] * (self.schedule.tokens(k) - 1)
