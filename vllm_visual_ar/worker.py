"""vLLM worker whose model runner samples images: guided pairs sampled as one, and each request's
forward shaped by its decoding strategy (`samplers/`), which this runner asks and never names.

Guidance: the runner mixes each pair's logits over the image tokens as the model family says
(`families.py`, e.g. `uncond + s * (cond - uncond)`), samples from the mixed row of the cond request (its
temperature, top-k, top-p and seed) and writes that token to the uncond request as well, so both
streams feed the same token next step. The scheduler (`scheduler.py`) guarantees both rows are in the batch.

Strategies (`samplers/strategy.py::StrategyRunner`, one object per strategy and runner): after vLLM
has laid out the batch, each strategy's half gets the rows of its requests that are past their
prompt and answers with a plan per row it rewrites: the fed tokens' positions, the tokens whose
logits it reads, who sees whom (then the model gets a `MaskedAttention` for those rows,
`model_executors/masked_attention.py`), tokens to write into speculative slots. After the forward
the runner mixes guidance over every planned logits row, lets vLLM's sampler draw once per request
(so a seeded request's generator advances the same way whatever shares its batch), and the half
turns its rows' logits into the tokens each request appends; vLLM's own bookkeeping appends them
(several per step, as in speculative decoding), which keeps KV slots, block allocation and frees
vLLM's. Rows no strategy plans take vLLM's own path. A strategy that is the model family's own
decoding order (`owns_batch`) prepares and samples the whole batch itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm.platforms import current_platform
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput, SamplerOutput

from vllm_visual_ar.families import family_of, image_layout, load_object
from vllm_visual_ar.model_executors.masked_attention import masked_attention_for
from vllm_visual_ar.requests import Decoding, ImageRequestInfo, image_request_info
from vllm_visual_ar.samplers import strategy_for
from vllm_visual_ar.samplers.strategy import DRAW_ONLY, RUNNER_REPORTS, RowPlan, Step, StrategyRunner

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _BaseWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _BaseWorker


@dataclass
class _StepLayout:
    step: Step
    logits_rows: list[slice]  # per batch row: its rows in the logits tensor
    planned: list[tuple[StrategyRunner, list[int]]]  # each strategy's half and the rows it planned
    draws_only: bool = False  # every row of the batch is planned DRAW_ONLY


class VisualARRunnerMixin:
    """Mixed into the platform's V1 model runner class (CPUModelRunner or GPUModelRunner)."""

    _step_layout: _StepLayout | None = None
    _requests_seen: dict | None = None  # request id -> (ImageRequestInfo or None, the half it needs or None)
    _halves: dict | None = None  # strategy class -> its runner half
    _owner = None  # the half that owns whole batches (a family's own order), False if none
    _guidance_mix = None  # the model family's guidance mix (cond, uncond, scale) -> logits
    _places_tokens = None  # whether the family's layout has tokens the engine places (or image tokens past id 0)
    _reports = None  # this step's strategy reports: request id -> report
    _guidance = None  # (the batch's request ids, their guided pairs) of the last step
    _guidance_tensors = None  # (those pairs, their logits-row tensors) when each request had one logits row
    _image_ids: slice | None = None

    def _mix(self, cond, uncond, scale):
        if self._guidance_mix is None:
            self._guidance_mix = load_object(family_of(self.model_config.hf_config).guidance_mix)
        return self._guidance_mix(cond, uncond, scale)

    def _image_id_slice(self) -> slice:
        """The vocabulary ids of image tokens (the family's layout): guidance mixes them, strategies
        read their logits."""
        if self._image_ids is None:
            ids = image_layout(self.model_config.hf_config).image_token_ids
            self._image_ids = slice(ids.start, ids.stop)
        return self._image_ids

    def _place_forced_tokens(self, logits, rows, planned=frozenset()) -> None:
        """Families whose image holds tokens no one samples (an end of line after each row, image-end
        tokens: `ImageLayout.forced`) get them here: the logits row of a request whose next token is
        forced keeps only that token, every other row of such a family keeps only the image tokens.
        Rows a strategy planned are its own: it reads the image tokens' logits and places those tokens itself."""
        config = self.model_config.hf_config
        if self._places_tokens is False:
            return
        for row, req_id in enumerate(self.input_batch.req_ids):
            info = self._image_info(req_id)
            if info is None or row in planned:  # vLLM's own sampling, or the strategy's
                continue
            if self._places_tokens is None:  # asked of the family's default layout once
                default = image_layout(config)
                self._places_tokens = bool(default.row_end is not None or default.image_end or default.image_token_ids.start)
                if not self._places_tokens:
                    return
            layout = image_layout(config, info.size)
            at = rows[row].start
            forced = layout.forced(len(self.requests[req_id].output_token_ids))
            if forced is not None:
                logits[at].fill_(float("-inf"))
                logits[at, forced] = 0.0
            else:
                logits[at, : layout.image_token_ids.start] = float("-inf")
                logits[at, layout.image_token_ids.stop:] = float("-inf")

    def _half_of(self, cls) -> StrategyRunner | None:
        if cls.runner is None:
            return None
        if self._halves is None:
            self._halves = {}
        if cls not in self._halves:
            self._halves[cls] = cls.runner(self.model_config.hf_config, self.get_model(), self.model_config.model,
                                           self.device)
        return self._halves[cls]

    def _batch_owner(self) -> StrategyRunner | None:
        if self._owner is None:
            half = self._half_of(strategy_for(self.model_config.hf_config, Decoding()))
            self._owner = half if half is not None and half.owns_batch else False
        return self._owner or None

    def _request(self, req_id: str) -> tuple[ImageRequestInfo | None, StrategyRunner | None, bool]:
        """(its info, the runner half that takes it, whether that half plans its single-token rows);
        parsed once per request (the scheduler has rejected malformed ones)."""
        if self._requests_seen is None:
            self._requests_seen = {}
        if req_id not in self._requests_seen:
            info = image_request_info(self.requests[req_id].sampling_params)
            cls = strategy_for(self.model_config.hf_config, info.decoding if info is not None else Decoding())
            half = self._half_of(cls)
            half = half if half is not None and half.takes(info) else None
            self._requests_seen[req_id] = (info, half, half is not None and half.takes_single(info))
        return self._requests_seen[req_id]

    def _image_info(self, req_id: str) -> ImageRequestInfo | None:
        return self._request(req_id)[0]

    def _on_request_state_removed(self, req_id, req_state) -> None:
        super()._on_request_state_removed(req_id, req_state)
        seen = self._requests_seen.pop(req_id, None) if self._requests_seen is not None else None
        if seen is not None and seen[1] is not None:
            seen[1].forget(req_id, seen[0])

    def _step(self) -> Step:
        batch = self.input_batch
        n = batch.num_reqs
        return Step(batch.req_ids, self.query_start_loc.np[: n + 1], batch.num_computed_tokens_cpu[:n],
                    batch.num_prompt_tokens[:n], self.requests, batch.generators, self.device, self._image_info,
                    lambda rows: masked_attention_for(self, rows))

    def _guidance_rows(self):
        """-> (cond rows, uncond rows, scales) of the guided pairs in this batch (batch rows), or None.
        Kept while the batch holds the same requests in the same rows (most steps)."""
        req_ids = tuple(self.input_batch.req_ids)
        if self._guidance is not None and self._guidance[0] == req_ids:
            return self._guidance[1]
        halves: dict[str, dict[str, int]] = {}
        scales: dict[str, float] = {}
        for row, req_id in enumerate(req_ids):
            info = self._image_info(req_id)
            if info is not None and info.guided:
                halves.setdefault(info.image_id, {})[info.role] = row
                scales[info.image_id] = info.guidance_scale
        for image_id, rows in halves.items():
            if len(rows) != 2:
                raise RuntimeError(f"guided image {image_id} has only its {list(rows)} stream in this batch")
        guided = ([h["cond"] for h in halves.values()], [h["uncond"] for h in halves.values()],
                  [scales[k] for k in halves]) if halves else None
        self._guidance = (req_ids, guided)
        return guided

    def _guidance_index(self, guided, rows: list[slice], device):
        """(cond logits rows, uncond logits rows, their scales [n, 1]) as tensors for the guided
        pairs; one logits row per request (no strategy planned this step) reuses the last ones."""
        one_each = len(rows) == self.input_batch.num_reqs and all(r.stop - r.start == 1 for r in rows)
        if one_each and self._guidance_tensors is not None and self._guidance_tensors[0] is guided:
            return self._guidance_tensors[1]
        cond = [i for r in guided[0] for i in range(rows[r].start, rows[r].stop)]
        uncond = [i for r in guided[1] for i in range(rows[r].start, rows[r].stop)]
        scale = [s for r, s in zip(guided[0], guided[2]) for _ in range(rows[r].stop - rows[r].start)]
        index = (torch.tensor(cond, device=device), torch.tensor(uncond, device=device),
                 torch.tensor(scale, device=device, dtype=torch.float32)[:, None])
        self._guidance_tensors = (guided, index) if one_each else None
        return index

    # -- inputs ----------------------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        logits_indices, spec_metadata, max_sampled = super()._prepare_inputs(
            scheduler_output, num_scheduled_tokens)
        self._step_layout = None
        model = self.get_model()
        model.masked_attention = None  # the model contract: set for a forward whose queries see other than causally
        if (owner := self._batch_owner()) is not None:
            indices, width = owner.prepare_batch(self._step())
            return torch.from_numpy(indices).to(logits_indices.device, logits_indices.dtype), None, width
        batch = self.input_batch
        n = batch.num_reqs
        # as lists: read for every row in every step
        fed = np.diff(self.query_start_loc.np[: n + 1]).tolist()
        computed, prompt_lens = batch.num_computed_tokens_cpu[:n].tolist(), batch.num_prompt_tokens[:n].tolist()
        by_half: dict[StrategyRunner, list[int]] = {}
        for row, req_id in enumerate(batch.req_ids):
            _, half, single = self._request(req_id)
            # A forward that does not reach the end of the prompt samples nothing: vLLM's own.
            if half is not None and computed[row] + fed[row] >= prompt_lens[row] and (
                    single or (fed[row] > 1 and computed[row] >= prompt_lens[row])):
                by_half.setdefault(half, []).append(row)
        if not by_half:
            return logits_indices, spec_metadata, max_sampled
        step = self._step()
        plans: dict[int, RowPlan] = {}
        planned = []
        for half, rows in by_half.items():
            mine = half.prepare(step, rows)
            if mine:
                plans.update(mine)
                planned.append((half, sorted(mine)))
        if not plans:
            return logits_indices, spec_metadata, max_sampled
        if spec_metadata is not None:
            raise RuntimeError("requests whose strategy rewrites their forward cannot run in an engine with "
                               "vLLM's speculative decoding enabled")
        if all(plan is DRAW_ONLY for plan in plans.values()):  # vLLM's forward: only the draws are planned
            self._step_layout = _StepLayout(step, [slice(i, i + 1) for i in range(batch.num_reqs)], planned,
                                            draws_only=len(plans) == batch.num_reqs)
            return logits_indices, None, max_sampled
        # Plain lists: a row's pieces are a few tokens each, too small for numpy to pay.
        qsl = step.query_start
        indices: list[int] = []
        logits_rows: list[slice] = []
        where: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        slot_tokens: list[int] = []
        visible = []
        for row in range(batch.num_reqs):
            start, end = int(qsl[row]), int(qsl[row + 1])
            first = len(indices)
            plan = plans.get(row)
            if plan is None or plan is DRAW_ONLY:
                indices.append(end - 1)
            else:
                indices += [start + j for j in plan.logits]
                if plan.positions is not None:
                    where += range(start, end)
                    positions += plan.positions
                if plan.visible is not None:
                    visible.append((row, plan.visible))
                if plan.slot_tokens is not None:
                    slots += range(end - len(plan.slot_tokens), end)
                    slot_tokens += plan.slot_tokens
            logits_rows.append(slice(first, len(indices)))
        if slots:
            tokens = torch.tensor(slot_tokens, dtype=self.input_ids.cpu.dtype)
            self.input_ids.cpu[torch.tensor(slots)] = tokens
            if self.input_ids.gpu is not self.input_ids.cpu:
                self.input_ids.gpu[torch.tensor(slots, device=self.input_ids.gpu.device)] = tokens.to(
                    self.input_ids.gpu.device)
        if where:
            device = self.positions.device
            self.positions[torch.tensor(where, device=device)] = torch.tensor(positions, dtype=self.positions.dtype,
                                                                              device=device)
        if visible:
            model.masked_attention = masked_attention_for(self, visible)
        self._step_layout = _StepLayout(step, logits_rows, planned)
        flat = torch.tensor(indices, dtype=logits_indices.dtype, device=logits_indices.device)
        return flat, None, max(r.stop - r.start for r in logits_rows)

    # -- sampling --------------------------------------------------------------------------------
    def sample_tokens(self, grammar_output):
        """vLLM's, with the strategies' reports of this step (`StrategyRunner.report`) attached to the
        output for the scheduler (`RUNNER_REPORTS`)."""
        self._reports = None
        output = super().sample_tokens(grammar_output)
        if self._reports:
            if not isinstance(output, ModelRunnerOutput) or output is EMPTY_MODEL_RUNNER_OUTPUT:
                raise RuntimeError(f"strategy reports cannot ride on a {type(output).__name__}")
            setattr(output, RUNNER_REPORTS, self._reports)
        return output

    def _sample(self, logits, spec_metadata):
        if logits is not None and (owner := self._batch_owner()) is not None:
            ids = owner.sample_batch(self._step(), logits)
            return SamplerOutput(sampled_token_ids=ids.to(self.device), logprobs_tensors=None)
        layout = self._step_layout
        if logits is None or spec_metadata is not None:
            return super()._sample(logits, spec_metadata)
        guided = self._guidance_rows()
        image_ids = self._image_id_slice() if guided is not None or layout is not None else None
        rows = layout.logits_rows if layout is not None else [slice(i, i + 1) for i in range(logits.shape[0])]
        if guided is not None:
            cond, uncond, scale = self._guidance_index(guided, rows, logits.device)
            mixed = self._mix(logits[cond, image_ids], logits[uncond, image_ids], scale)
            logits[cond, image_ids] = mixed.to(logits.dtype)
        self._place_forced_tokens(logits, rows, {r for _, mine in layout.planned for r in mine} if layout else ())
        if layout is None:
            output = super()._sample(logits, spec_metadata)
            if guided is not None:
                output.sampled_token_ids[guided[1]] = output.sampled_token_ids[guided[0]]
            return output
        # vLLM's sampler takes one row per request (each request's first) and draws for all of them;
        # the strategies then turn their rows' logits into tokens, and vLLM's draws for planned rows
        # are thrown away. The generators of the planned requests are set aside during its call
        # (their rows draw from the global one), so that a seeded request's generator gives its
        # strategy the same draws whatever shares its batch, and is not spent on a draw nobody uses.
        # It still runs when every row is planned: skipping it then made a step in which every image
        # took drafts cheaper by the sampler's fixed cost, which the load-aware cost model
        # (`load.StepCost`, linear in the step's shape) read as drafts being cheap, and it widened
        # every image under load (side run, load-aware windows of 64 at 64 in flight: 0.71x raster,
        # 0.98x without the skip). A batch of draw-only rows alone skips it: their tokens are the strategy's own
        # draws, and such rows take no drafts.
        if layout.draws_only and self.input_batch.max_num_logprobs is None:
            output = SamplerOutput(sampled_token_ids=torch.full((len(rows), 1), -1, dtype=torch.int32),
                                   logprobs_tensors=None)
        else:
            first = torch.tensor([r.start for r in rows], device=logits.device)
            generators = self.input_batch.generators
            aside = {r: generators.pop(r) for _, mine in layout.planned for r in mine if r in generators}
            try:
                output = super()._sample(logits[first], None)
            finally:
                generators.update(aside)
        uncond_rows = set(guided[1]) if guided is not None else set()
        emitted: dict[int, list[int]] = {}
        reports: dict[int, object] = {}
        for half, planned in layout.planned:
            sampling = [r for r in planned if r not in uncond_rows]
            if sampling:
                emitted.update(half.emit(layout.step, sampling, logits[:, image_ids], rows))
                reports.update((r, report) for r in sampling if (report := half.report(layout.step, r)) is not None)
        if reports:
            partner = dict(zip(guided[0], guided[1])) if guided is not None else {}
            req_ids = self.input_batch.req_ids
            self._reports = {req_ids[r]: report for row, report in reports.items()
                             for r in (row, partner.get(row)) if r is not None}
        width = max((len(t) for t in emitted.values()), default=1)
        table = [[t] + [-1] * (width - 1) for t in output.sampled_token_ids[:, 0].tolist()]
        for row, tokens in emitted.items():
            table[row] = list(tokens) + [-1] * (width - len(tokens))
        ids = torch.tensor(table, dtype=torch.int32)
        if guided is not None:
            ids[guided[1]] = ids[guided[0]]
        output.sampled_token_ids = ids.to(self.device)
        if output.logprobs_tensors is not None and width > 1:
            # One logprobs row per output slot, as parse_output expects; only column 0 is ever valid
            # for a request that asked for logprobs (planned requests cannot).
            lt = output.logprobs_tensors
            output.logprobs_tensors = lt._replace(logprob_token_ids=lt.logprob_token_ids.repeat_interleave(width, 0),
                                                  logprobs=lt.logprobs.repeat_interleave(width, 0),
                                                  selected_token_ranks=lt.selected_token_ranks.repeat_interleave(width, 0))
        return output


_runner_classes: dict[type, type] = {}


def visual_ar_runner_class(base: type) -> type:
    if base not in _runner_classes:
        _runner_classes[base] = type(f"VisualAR{base.__name__}", (VisualARRunnerMixin, base), {})
    return _runner_classes[base]


class VisualARWorker(_BaseWorker):
    """The platform's worker, with the runner's class swapped for the plugin's subclass (the mixin
    adds methods only, so swapping the class of the constructed runner is safe)."""

    def init_device(self):
        super().init_device()
        if getattr(self, "use_v2_model_runner", False):
            raise RuntimeError("vllm-visual-ar needs vLLM's V1 model runner: set VLLM_USE_V2_MODEL_RUNNER=0")
        self.model_runner.__class__ = visual_ar_runner_class(type(self.model_runner))
