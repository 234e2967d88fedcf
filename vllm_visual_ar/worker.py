"""vLLM worker whose model runner decodes images: guided pairs sampled as one, and ZipAR.

Guidance: the runner mixes each pair's logits as LlamaGen does, `uncond + s * (cond - uncond)` over
the image codes, samples from the mixed row of the cond request (its temperature, top-k, top-p and
seed) and writes that token to the uncond request as well, so both streams feed the same token
next step. The scheduler (`scheduler.py`) guarantees both rows are in the batch.

ZipAR (`samplers/zipar.py`): a request's forward feeds every token its previous forward emitted
(one per active row, plus a stand-in or a finished row's last token). The runner gives those
tokens their raster positions (2D RoPE), logits at every token that predicts something, a
`MaskedAttention` so each query sees only cached tokens at raster positions <= its own, and
returns one sample per active row plus, when the next forward starts a row, the stand-in token.
vLLM's own bookkeeping appends them all as output tokens (several per step, as in speculative
decoding), which keeps KV slots, block allocation and frees vLLM's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm.platforms import current_platform

from vllm_visual_ar.model_executors.masked_attention import MaskedAttention
from vllm_visual_ar.requests import ImageRequestInfo, image_request_info
from vllm_visual_ar.samplers.sampling import cfg_mix, sample
from vllm_visual_ar.samplers.zipar import ZipARSchedule, zipar_schedule

if current_platform.is_cpu():
    from vllm.v1.worker.cpu_worker import CPUWorker as _BaseWorker
else:
    from vllm.v1.worker.gpu_worker import Worker as _BaseWorker


@dataclass
class _ZipARRow:
    row: int                 # batch row
    schedule: ZipARSchedule
    step: int                # which forward of its schedule this is
    logits: slice            # its rows in this forward's logits


@dataclass
class _StepLayout:
    logits_rows: list[slice]  # per batch row: its rows in the logits tensor
    zipar: list[_ZipARRow]


@dataclass(frozen=True)
class _ScheduleTags:
    """Per KV slot of a ZipAR sequence: raster position (-1 for the prompt) and stand-in flag."""
    raster: torch.Tensor
    stand_in: torch.Tensor


_tags: dict[tuple[int, int, int, int], _ScheduleTags] = {}


def _schedule_tags(schedule: ZipARSchedule, prefix: int) -> _ScheduleTags:
    key = (schedule.height, schedule.width, schedule.window, prefix)
    if key not in _tags:
        raster = [-1] * prefix + [e.raster for e in schedule.sequence]
        stand_in = [False] * prefix + [e.stand_in for e in schedule.sequence]
        _tags[key] = _ScheduleTags(torch.tensor(raster), torch.tensor(stand_in))
    return _tags[key]


class VisualARRunnerMixin:
    """Mixed into the platform's V1 model runner class (CPUModelRunner or GPUModelRunner)."""

    _step_layout: _StepLayout | None = None

    def _image_info(self, req_id: str) -> ImageRequestInfo | None:
        return image_request_info(self.requests[req_id].sampling_params)

    def _guidance_rows(self):
        """-> (cond rows, uncond rows, scales) of the guided pairs in this batch (batch rows), or None."""
        halves: dict[str, dict[str, int]] = {}
        scales: dict[str, float] = {}
        for row, req_id in enumerate(self.input_batch.req_ids):
            info = self._image_info(req_id)
            if info is not None and info.guided:
                halves.setdefault(info.image_id, {})[info.role] = row
                scales[info.image_id] = info.guidance_scale
        if not halves:
            return None
        for image_id, rows in halves.items():
            if len(rows) != 2:
                raise RuntimeError(f"guided image {image_id} has only its {list(rows)} stream in this batch")
        return ([h["cond"] for h in halves.values()], [h["uncond"] for h in halves.values()],
                [scales[k] for k in halves])

    # -- inputs ----------------------------------------------------------------------------------
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        logits_indices, spec_decode_metadata, max_sampled = super()._prepare_inputs(
            scheduler_output, num_scheduled_tokens)
        model = self.get_model()
        model.masked_attention = None
        self._step_layout = None
        cfg = self.model_config.hf_config
        prefix = getattr(cfg, "cls_token_num", 0)
        num_reqs = self.input_batch.num_reqs
        qsl = self.query_start_loc.np[: num_reqs + 1]
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
        zipar: list[_ZipARRow] = []
        indices: list[list[int]] = []
        for row, req_id in enumerate(self.input_batch.req_ids):
            info = self._image_info(req_id)
            start, end = int(qsl[row]), int(qsl[row + 1])
            if info is None or info.decoding.strategy != "zipar" or computed[row] < prefix:
                indices.append([end - 1])  # the prompt forward of a ZipAR request is an ordinary one
                continue
            schedule = zipar_schedule(cfg.image_grid, cfg.image_grid, info.decoding.window)
            step = schedule.step_of_first_fed.get(int(computed[row]) - prefix)
            fed = schedule.fed(step) if step is not None else range(0)
            if step is None or len(fed) != end - start:
                raise RuntimeError(f"ZipAR request {req_id}: scheduled {end - start} tokens at KV length "
                                   f"{computed[row]}, which is no forward of its schedule")
            entries = schedule.sequence[fed.start:fed.stop]
            predicting = [start + j for j, e in enumerate(entries) if e.predicts is not None]
            first = sum(len(i) for i in indices)
            zipar.append(_ZipARRow(row, schedule, step, slice(first, first + len(predicting))))
            indices.append(predicting)
            self.positions[start:end] = torch.tensor([prefix + e.raster for e in entries],
                                                     dtype=self.positions.dtype)
        if not zipar:
            return logits_indices, spec_decode_metadata, max_sampled
        if spec_decode_metadata is not None:
            raise RuntimeError("ZipAR requests cannot run in an engine with speculative decoding enabled")
        model.masked_attention = self._masked_attention(zipar, qsl, computed, prefix)
        bounds = [0]
        for i in indices:
            bounds.append(bounds[-1] + len(i))
        self._step_layout = _StepLayout([slice(a, b) for a, b in zip(bounds, bounds[1:])], zipar)
        flat = torch.tensor([i for group in indices for i in group], dtype=logits_indices.dtype)
        return flat.to(logits_indices.device), None, max(len(i) for i in indices)

    def _masked_attention(self, zipar: list[_ZipARRow], qsl, computed, prefix: int) -> MaskedAttention:
        """Each ZipAR query sees the request's cached tokens (this forward's included) whose raster
        position is <= its own, except stand-ins other than itself; the class token is seen by all."""
        table = self.input_batch.block_table[0]
        block_size = table.block_size
        lengths = [int(computed[z.row]) + int(qsl[z.row + 1] - qsl[z.row]) for z in zipar]
        nq = max(int(qsl[z.row + 1] - qsl[z.row]) for z in zipar)
        nk = max(lengths)
        b = len(zipar)
        query_index = torch.zeros(b, nq, dtype=torch.long)
        query_valid = torch.zeros(b, nq, dtype=torch.bool)
        query_slots = torch.zeros(b, nq, dtype=torch.long)
        key_slots = torch.zeros(b, nk, dtype=torch.long)
        mask = torch.zeros(b, nq, nk, dtype=torch.bool)
        mask[:, :, 0] = True  # padding queries attend to something (their output is dropped)
        for i, (z, length) in enumerate(zip(zipar, lengths)):
            tags = _schedule_tags(z.schedule, prefix)
            pos = torch.arange(length)
            blocks = torch.from_numpy(table.block_table.np[z.row, : (length + block_size - 1) // block_size])
            slots = blocks.long()[pos // block_size] * block_size + pos % block_size
            key_slots[i, :length] = slots
            n = int(qsl[z.row + 1] - qsl[z.row])
            q = pos[length - n:]
            query_index[i, :n] = torch.arange(int(qsl[z.row]), int(qsl[z.row + 1]))
            query_index[i, n:] = int(qsl[z.row])
            query_valid[i, :n] = True
            query_slots[i, :n] = slots[q]
            raster, stand_in = tags.raster[:length], tags.stand_in[:length]
            seen = (raster[None, :] <= raster[q][:, None]) & (~stand_in[None, :] | (pos[None, :] == q[:, None]))
            mask[i, :n, :length] = seen
        device = self.device
        return MaskedAttention(query_index.to(device), query_valid.to(device), query_slots.to(device),
                               key_slots.to(device), mask.to(device))

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        layout = self._step_layout
        if logits is None or spec_decode_metadata is not None:
            return super()._sample(logits, spec_decode_metadata)
        k = self.model_config.hf_config.codebook_size
        guided = self._guidance_rows()
        rows = layout.logits_rows if layout is not None else [slice(i, i + 1) for i in range(logits.shape[0])]
        if guided is not None:
            cond = torch.cat([torch.arange(rows[r].start, rows[r].stop) for r in guided[0]]).to(logits.device)
            uncond = torch.cat([torch.arange(rows[r].start, rows[r].stop) for r in guided[1]]).to(logits.device)
            scale = torch.tensor([s for r, s in zip(guided[0], guided[2]) for _ in range(rows[r].stop - rows[r].start)],
                                 device=logits.device, dtype=torch.float32)[:, None]
            logits[cond, :k] = cfg_mix(logits[cond, :k], logits[uncond, :k], scale).to(logits.dtype)
        if layout is None:
            output = super()._sample(logits, spec_decode_metadata)
            if guided is not None:
                output.sampled_token_ids[guided[1]] = output.sampled_token_ids[guided[0]]
            return output
        # vLLM's sampler draws for every request from its first row; ZipAR rows are redrawn below.
        first = torch.tensor([r.start for r in rows], device=logits.device)
        output = super()._sample(logits[first], None)
        emitted = {z.row: self._zipar_tokens(z, logits[z.logits, :k]) for z in layout.zipar}
        width = max(len(t) for t in emitted.values())
        ids = torch.full((len(rows), width), -1, dtype=output.sampled_token_ids.dtype,
                         device=output.sampled_token_ids.device)
        ids[:, :1] = output.sampled_token_ids[:, :1]
        for row, tokens in emitted.items():
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        if guided is not None:
            ids[guided[1]] = ids[guided[0]]
        output.sampled_token_ids = ids
        if output.logprobs_tensors is not None and width > 1:
            # One logprobs row per output slot, as parse_output expects; only column 0 is ever valid
            # for a request that asked for logprobs (ZipAR requests cannot).
            lt = output.logprobs_tensors
            output.logprobs_tensors = lt._replace(logprob_token_ids=lt.logprob_token_ids.repeat_interleave(width, 0),
                                                  logprobs=lt.logprobs.repeat_interleave(width, 0),
                                                  selected_token_ranks=lt.selected_token_ranks.repeat_interleave(width, 0))
        return output

    def _zipar_tokens(self, z: _ZipARRow, logits: torch.Tensor) -> list[int]:
        """This forward's emitted tokens for one ZipAR request: a sample per predicting row, in
        order, then the stand-in if the schedule starts a row next forward."""
        req_id = self.input_batch.req_ids[z.row]
        params = self.requests[req_id].sampling_params
        top_k = params.top_k if params.top_k and params.top_k > 0 else 0
        tokens = sample(logits.float(), params.temperature, top_k, params.top_p,
                        self.input_batch.generators.get(z.row)).tolist()
        emitted = z.schedule.emitted(z.step)
        last = z.schedule.sequence[emitted.stop - 1]
        if last.stand_in:
            where = z.schedule.raster_order[last.copy_of]
            history = self.requests[req_id].output_token_ids
            tokens.append(history[where] if where < len(history) else tokens[where - emitted.start])
        return tokens


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
