"""Offline batch API: classes in, PIL images out, on `vllm.LLM`.

    from vllm_visual_ar import ImageGenerator
    gen = ImageGenerator()                      # the embedded MNIST model
    images = gen.generate(classes=[3, 7], n=4, guidance_scale=4.0, seed=0)
    images = gen.generate(classes=[3, 7], strategy="zipar", window=4)   # row-parallel decoding
    images[0].image.save("three.png"); print(images[0].stats)
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import torch

from vllm_visual_ar.engine import engine_kwargs, set_engine_env
from vllm_visual_ar.admission import image_cannot_fit
from vllm_visual_ar.requests import (Decoding, SamplingSettings, check_number, check_seed, check_text, image_requests,
                                     parse_size, prompt_pair, step_drafts, step_width,
                                     validate_class_id)


@dataclass
class ImageStats:
    tokens: int           # image tokens generated
    forward_passes: int   # model forwards this image took (raster: one per token)
    seconds: float        # latency: from submission to this image's last token
    streams: int          # 2 for a guided image (cond + uncond), else 1
    draft_tokens: int = 0     # SJD: drafts verified
    accepted_drafts: int = 0  # SJD: drafts accepted

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forward_passes

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_drafts / self.draft_tokens if self.draft_tokens else None


@dataclass
class GeneratedImage:
    image: "object"        # PIL.Image
    class_id: int | None   # class-conditional models
    codes: torch.Tensor    # the image's code token ids: [rows, cols] in raster order, or flat scale by scale (VAR)
    seed: int | None
    stats: ImageStats
    prompt: str | None = None  # text-to-image models


def check_generate_args(config, classes, n, seed, guidance_scale, temperature, top_k, top_p,
                        strategy="raster", prompts=None, size=None, **options):
    """Validate `generate` arguments against a model config (ValueError naming the problem);
    `options`: the decoding options (`requests.DECODING_OPTIONS`), unset ones None;
    -> (the prompts as a list: class ids, or texts for a text-to-image model; SamplingSettings with
    the model's defaults filled in; Decoding)."""
    from vllm_visual_ar.families import family_of
    from vllm_visual_ar.samplers import decoding_problem

    family = family_of(config)
    if family.takes_text:
        if classes is not None:
            raise ValueError("this model is text-to-image: give prompts=[...], not classes")
        items = [prompts] if isinstance(prompts, str) else list(prompts or [])
        if not items:
            raise ValueError("prompts must hold at least one text prompt")
        for text in items:
            check_text(text, "prompt")
    else:
        if prompts is not None:
            raise ValueError("this model is class-conditional: give classes=[...], not prompts")
        items = [classes] if isinstance(classes, int) else list(classes or [])
        if not items:
            raise ValueError("classes must name at least one class")
        for c in items:
            validate_class_id(config, c)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    check_seed(seed, len(items) * n)
    decoding = Decoding(strategy, **options).fitted(config, size)
    if problem := decoding_problem(config, decoding):
        raise ValueError(problem)
    settings = SamplingSettings(family.default(config, "guidance_scale") if guidance_scale is None else guidance_scale,
                                temperature, family.default(config, "top_k", 0) if top_k is None else top_k,
                                family.default(config, "top_p", 1.0) if top_p is None else top_p,
                                unguided_scale=family.unguided_scale)
    return items, settings, decoding


class ImageGenerator:
    def __init__(self, model: str | None = None, max_images_in_flight: int = 16, **engine_overrides):
        from vllm import LLM

        from vllm_visual_ar.families import family_of

        set_engine_env()
        kwargs = engine_kwargs(model, max_images_in_flight, **engine_overrides)
        self.model_dir = kwargs["model"]
        self.family = family_of(self.model_dir)
        self.config = self.family.config(self.model_dir)
        self.layout = self.family.image_layout(self.config)
        self.decode_codes = self.family.decoder(self.model_dir)
        self.llm = LLM(**kwargs)
        # Text-to-image models: vLLM's own tokenizer for the model, which builds the prompts.
        self.tokenizer = self.llm.get_tokenizer() if self.family.takes_text else None

    def generate(self, classes: list[int] | int | None = None, n: int = 1, guidance_scale: float | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None,
                 strategy: str = "raster", window: int | None = None, init: str | None = None,
                 relaxed_delta: float | None = None, relaxed_neighbours: int | None = None,
                 draft_steps: int | None = None, progress: bool = False,
                 timeout: float | None = None, prompts: list[str] | str | None = None,
                 negative_prompt: str | None = None, size=None, coupled: bool | None = None,
                 continue_after_reject: bool | None = None, load_aware: bool | None = None,
                 sjd_window: int | None = None, group_acceptance: bool | None = None,
                 draft_candidates: int | None = None) -> list[GeneratedImage]:
        """n images per class (class-conditional models) or per prompt (text-to-image models:
        `prompts`, an optional `negative_prompt` for the unconditional stream, `size` as "WxH" or
        (width, height) among the model's sizes), in order. Image i of the call uses seed + i, so a seed
        gives the same images whatever else is in the batch. guidance_scale and top_k None mean
        the model's `default_guidance_scale` / `default_top_k` (top_p None: its `default_top_p`, or off);
        guidance 1 is unguided (VAR: 0), top_k 0 is off.
        strategy "zipar" with `window` w decodes rows in parallel (`samplers/zipar.py`); "sjd" verifies
        `window` (default 16) drafts per forward, initialised by `init` ("random" or "horizontal";
        `samplers/sjd.py`), with relaxed (LANTERN-style, not exact) acceptance if `relaxed_delta` is set,
        GSD's group acceptance (not exact either) if `group_acceptance`.
        `coupled` (raster, "sjd") draws each token from noise fixed per (seed, position)
        (`samplers/coupling.py`): a seed then gives the same image in raster order and with SJD.
        `continue_after_reject` (SJD): SJD-PAC's adaptive continuation, the drafts after a rejection kept
        where they still fit (`samplers/sjd.py::verify`). `draft_candidates` K (SJD, exact): the first
        draft of each forward has K - 1 siblings fed beside the chain (SJD-PAC's draft tree, first
        level; `samplers/sjd.py::verify_with_siblings`). `load_aware` (SJD, opt-in): the window is a
        ceiling that the scheduler narrows step by step when extra tokens would cost throughput
        (`samplers/load.py`); an uncoupled SJD image then depends on the load, a coupled one does not.
        With ZipAR the window is the most parallel one the scheduler may pick when it admits the image
        (rows fixed for the image's life: raster order under load where rows would cost throughput).
        "zipar_sjd": ZipAR's rows (`window`), each verifying up to `sjd_window` (default 8) tokens per
        forward with SJD's rule (`samplers/zipar_sjd.py`; `init` default "horizontal"); load-aware, the
        scheduler may run it as ZipAR's rows alone or in raster order instead, chosen at admission,
        and where it keeps its own it starts each row only in a step that gains from it.
        VAR models decode scale by scale; with a CoDe folder, strategy "code" with `draft_steps` N lets
        the drafter decode scales 0..N-1 and the refiner the rest (`samplers/next_scale.py`); guidance 0
        is unguided there (VAR's cfg).
        An image this engine could never schedule is a ValueError before anything is submitted; with
        `timeout` (seconds), the call aborts its images and raises TimeoutError when time is up."""
        size = self.family.size(self.config, parse_size(size))
        options = dict(window=window, init=init, relaxed_delta=relaxed_delta, relaxed_neighbours=relaxed_neighbours,
                       draft_steps=draft_steps, coupled=coupled, continue_after_reject=continue_after_reject,
                       load_aware=load_aware, sjd_window=sjd_window, group_acceptance=group_acceptance,
                       draft_candidates=draft_candidates)
        items, settings, decoding = check_generate_args(self.config, classes, n, seed, guidance_scale, temperature,
                                                        top_k, top_p, strategy, prompts, size, **options)
        if timeout is not None:
            timeout = check_number(timeout, "timeout", 0, 1e9, low_open=True)
        layout = self.family.image_layout(self.config, size)
        # Every prompt's ids (and the size and negative prompt's checks) before anything is submitted.
        pairs = {item: prompt_pair(self.config, item, negative_prompt, size, self.tokenizer) for item in set(items)}
        prompt_tokens = max(len(ids) for cond, uncond, _ in pairs.values() for ids in (cond, uncond))
        if problem := image_cannot_fit(self.llm.llm_engine.vllm_config, self.config, decoding, settings.guided,
                                       size, prompt_tokens):
            raise ValueError(problem)

        jobs = [(c, None if seed is None else seed + i) for i, c in enumerate(c for c in items for _ in range(n))]
        tokens, forwards, latency, drafts = self._run(jobs, settings, decoding, progress, timeout, layout,
                                                      dict(size=size, negative_prompt=negative_prompt))
        codes = layout.codes_of(torch.tensor(tokens))
        images = self.decode(codes, layout)
        if layout.scale_tokens is None:  # a raster grid; VAR's codes stay flat, scale by scale
            codes = codes.view(-1, layout.rows, layout.cols)
        streams = 2 if settings.guided else 1
        text = self.family.takes_text
        return [GeneratedImage(img, None if text else c, codes[i], s,
                               ImageStats(len(tokens[i]), forwards[i], latency[i], streams, *drafts[i]),
                               c if text else None)
                for i, ((c, s), img) in enumerate(zip(jobs, images))]

    def _run(self, jobs, settings: SamplingSettings, decoding: Decoding, progress: bool, timeout: float | None,
             layout, request_args: dict):
        """Submit every image, step the engine until all are done. Outputs come as per-step deltas,
        so an image's forward passes are counted, not assumed: one per step that advanced it (a
        ZipAR image advances its raster prefix every step too, see `scheduler.py`)."""
        from tqdm import tqdm
        from vllm.sampling_params import RequestOutputKind

        from vllm_visual_ar.samplers import strategy_for

        draft_stats = strategy_for(self.config, decoding).draft_stats
        engine = self.llm.llm_engine
        owner: dict[str, int] = {}  # request id -> image index, for the stream that carries the image
        submitted: list[str] = []
        tokens: list[list[int]] = [[] for _ in jobs]
        forwards = [0] * len(jobs)
        latency = [0.0] * len(jobs)
        drafts = [[0, 0] for _ in jobs]  # [drafts verified, drafts accepted] per image (SJD)
        bar = tqdm(total=len(jobs) * layout.num_tokens, unit="tok", disable=not progress,
                   desc=f"{len(jobs)} images")
        t0 = time.perf_counter()
        try:
            for index, (class_id, seed) in enumerate(jobs):
                image_id = uuid.uuid4().hex
                for prompt, params in image_requests(self.config, class_id, settings, seed, image_id=image_id,
                                                     decoding=decoding, tokenizer=self.tokenizer, **request_args):
                    params.output_kind = RequestOutputKind.DELTA
                    role = params.extra_args["visual_ar"]["role"]
                    request_id = f"{image_id}-{role}"
                    engine.add_request(request_id, prompt, params)
                    submitted.append(request_id)
                    if role != "uncond":
                        owner[request_id] = index
            while engine.has_unfinished_requests():
                if timeout is not None and time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"{len(jobs)} images not done within {timeout:g} s; aborted")
                for out in engine.step():
                    index = owner.get(out.request_id)
                    if index is None:
                        continue
                    new = out.outputs[0].token_ids
                    if new:
                        if tokens[index]:  # not the prompt forward
                            verified, accepted = step_drafts(out) or draft_stats(
                                decoding, layout.num_tokens, len(tokens[index]), len(new), step_width(out))
                            drafts[index][0] += verified
                            drafts[index][1] += accepted
                        forwards[index] += 1
                        tokens[index] += new
                        bar.update(len(new))
                    if out.finished:
                        latency[index] = time.perf_counter() - t0
                        if len(tokens[index]) != layout.num_tokens:
                            raise RuntimeError(f"image {index} ended after {len(tokens[index])} tokens "
                                               f"({out.outputs[0].finish_reason})")
        except BaseException:
            engine.abort_request(submitted)
            raise
        finally:
            bar.close()
        return tokens, forwards, latency, drafts

    def decode(self, codes: torch.Tensor, layout=None) -> list:
        """codes [N, image codes] (or [N, grid, grid]; the code token ids of `layout`, default the
        model's one size) -> PIL images (grayscale for 1-channel tokenizers, else RGB)."""
        from PIL import Image

        from vllm_visual_ar.model_executors.vq import images_to_uint8

        layout = layout or self.layout
        codes = codes.reshape(codes.shape[0], -1)
        grid = (layout.rows, layout.cols)
        pixels = images_to_uint8(torch.cat([self.decode_codes(c, grid) for c in codes.split(64)]))
        if pixels.shape[-1] == 1:
            return [Image.fromarray(p[..., 0].numpy(), mode="L") for p in pixels]
        return [Image.fromarray(p.numpy(), mode="RGB") for p in pixels]
