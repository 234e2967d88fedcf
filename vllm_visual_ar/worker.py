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

SJD (`samplers/sjd.py`): the scheduler gives an SJD request spec-token slots; the runner writes the
image's Jacobi drafts into them (the same drafts into both guidance streams), takes logits at every
fed token, verifies the drafts against the guided, filtered, tempered targets and returns the
committed tokens (accepted drafts + one); vLLM's spec-decoding accounting rolls back the KV of the
rest. The image's Jacobi state (carried drafts and the distributions they were drawn from) lives
here between forwards.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm.platforms import current_platform

from vllm_visual_ar.model_executors.masked_attention import MaskedAttention, masked_attention_for
from vllm_visual_ar.requests import ImageRequestInfo, image_request_info
from vllm_visual_ar.samplers import family_decoding
from vllm_visual_ar.samplers.sampling import cfg_mix, sample_rows
from vllm_visual_ar.samplers.sjd import Drafts, fill_drafts, latent_neighbours, target_probs, verify
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
class _SJDRow:
    row: int                 # batch row
    info: ImageRequestInfo
    tokens: slice            # its fed tokens in the flat batch: x0, then the drafts
    logits: slice            # its rows in this forward's logits (one per fed token)


@dataclass
class _SJDState:
    """One SJD image's Jacobi state between forwards (shared by its two guidance streams)."""
    carried: Drafts
    current: Drafts | None = None


@dataclass
class _StepLayout:
    logits_rows: list[slice]  # per batch row: its rows in the logits tensor
    zipar: list[_ZipARRow]
    sjd: dict[str, list[_SJDRow]]  # image id -> its rows, the stream that samples (cond or single) first


_visibility: dict[tuple[int, int, int, int], np.ndarray] = {}


def _schedule_visibility(schedule: ZipARSchedule, prefix: int) -> np.ndarray:
    """[S, S] bool over a ZipAR request's sequence positions (prompt first): position s sees
    position j iff j's raster index <= s's and j is not a stand-in other than s itself. The prompt
    counts as raster -1: seen by all. The runner slices the rows and columns a forward needs."""
    key = (schedule.height, schedule.width, schedule.window, prefix)
    if key not in _visibility:
        raster = np.array([-1] * prefix + [e.raster for e in schedule.sequence])
        stand_in = np.array([False] * prefix + [e.stand_in for e in schedule.sequence])
        seen = (raster[None, :] <= raster[:, None]) & ~stand_in[None, :]
        np.fill_diagonal(seen, True)
        _visibility[key] = seen
    return _visibility[key]


class VisualARRunnerMixin:
    """Mixed into the platform's V1 model runner class (CPUModelRunner or GPUModelRunner)."""

    _step_layout: _StepLayout | None = None
    _infos: dict | None = None
    _sjd_states: dict | None = None  # image id -> _SJDState
    _neighbours: dict | None = None  # k -> [codebook, k] latent neighbours (relaxed SJD)
    _order = None  # the runner half of a family's own decoding order (VAR), False if none

    def _family_order(self):
        if self._order is None:
            order = family_decoding(self.model_config.hf_config, 1)
            self._order = order(self.model_config.hf_config, self.get_model()) if order is not None else False
        return self._order or None

    def _image_info(self, req_id: str) -> ImageRequestInfo | None:
        """Parsed once per request (the scheduler has rejected malformed ones)."""
        if self._infos is None or len(self._infos) > 2 * len(self.requests) + 64:
            self._infos = {r: i for r, i in (self._infos or {}).items() if r in self.requests}
        if req_id not in self._infos:
            self._infos[req_id] = image_request_info(self.requests[req_id].sampling_params)
        return self._infos[req_id]

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
        if (order := self._family_order()) is not None:
            return order.prepare(self, logits_indices)
        model = self.get_model()
        model.masked_attention = None
        self._step_layout = None
        cfg = self.model_config.hf_config
        prefix = getattr(cfg, "cls_token_num", 0)
        num_reqs = self.input_batch.num_reqs
        qsl = self.query_start_loc.np[: num_reqs + 1]
        computed = self.input_batch.num_computed_tokens_cpu[:num_reqs]
        zipar: list[_ZipARRow] = []
        sjd: list[_SJDRow] = []
        indices: list[list[int]] = []
        raster_positions: list[tuple[int, list[int]]] = []
        for row, req_id in enumerate(self.input_batch.req_ids):
            info = self._image_info(req_id)
            start, end = int(qsl[row]), int(qsl[row + 1])
            strategy = info.decoding.strategy if info is not None and computed[row] >= prefix else "raster"
            if strategy == "sjd" and end - start > 1:  # x0 and end - start - 1 drafts, filled below
                sjd.append(_SJDRow(row, info, slice(start, end),
                                   slice(sum(len(i) for i in indices), sum(len(i) for i in indices) + end - start)))
                indices.append(list(range(start, end)))
                continue
            schedule = (zipar_schedule(cfg.image_grid, cfg.image_grid, info.decoding.window)
                        if strategy == "zipar" else None)
            if schedule is None or schedule.window == cfg.image_grid:
                # Raster requests, ZipAR with w >= W (raster order exactly), SJD forwards without
                # drafts, and every request's prompt forward take vLLM's ordinary path.
                indices.append([end - 1])
                continue
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
            raster_positions.append((start, [prefix + e.raster for e in entries]))
        if not zipar and not sjd:
            return logits_indices, spec_decode_metadata, max_sampled
        if spec_decode_metadata is not None:
            raise RuntimeError("ZipAR and SJD requests cannot run in an engine with speculative decoding enabled")
        if raster_positions:
            where = torch.tensor([start + j for start, pos in raster_positions for j in range(len(pos))])
            self.positions[where.to(self.positions.device)] = torch.tensor(
                [p for _, pos in raster_positions for p in pos], dtype=self.positions.dtype).to(self.positions.device)
            model.masked_attention = self._masked_attention(zipar, prefix)
        sjd_images: dict[str, list[_SJDRow]] = {}
        for r in sjd:
            sjd_images.setdefault(r.info.image_id, []).append(r)
        for rows in sjd_images.values():
            rows.sort(key=lambda r: r.info.role == "uncond")
        if sjd_images:
            self._fill_sjd_drafts(sjd_images)
        bounds = [0]
        for i in indices:
            bounds.append(bounds[-1] + len(i))
        self._step_layout = _StepLayout([slice(a, b) for a, b in zip(bounds, bounds[1:])], zipar, sjd_images)
        flat = torch.tensor([i for group in indices for i in group], dtype=logits_indices.dtype)
        return flat.to(logits_indices.device), None, max(len(i) for i in indices)

    def _fill_sjd_drafts(self, images: dict[str, list["_SJDRow"]]) -> None:
        """Write each image's drafts (carried Jacobi tail, then initialised) into both streams' inputs."""
        vocab, grid = self.model_config.hf_config.codebook_size, self.model_config.hf_config.image_grid
        if self._sjd_states is None:
            self._sjd_states = {}
        if len(self._sjd_states) > len(self.requests):  # images that finished or were aborted
            live = {self._image_info(r).image_id for r in self.requests if self._image_info(r) is not None}
            for gone in set(self._sjd_states) - live:
                del self._sjd_states[gone]
        for image_id, rows in images.items():
            lead = rows[0]
            state = self._sjd_states.setdefault(image_id, _SJDState(Drafts.empty(vocab)))
            history = self.requests[self.input_batch.req_ids[lead.row]].output_token_ids
            count = lead.tokens.stop - lead.tokens.start - 1
            state.current = fill_drafts(state.carried, count, lead.info.decoding.init, vocab, history[-1],
                                        len(history), grid, self.input_batch.generators.get(lead.row), self.device)
            drafts = torch.tensor(state.current.tokens, dtype=self.input_ids.cpu.dtype)
            for r in rows:
                if r.tokens.stop - r.tokens.start - 1 != count:
                    raise RuntimeError(f"SJD image {image_id}: its streams got different numbers of draft slots")
                self.input_ids.cpu[r.tokens.start + 1:r.tokens.stop] = drafts
                self.input_ids.gpu[r.tokens.start + 1:r.tokens.stop] = drafts.to(self.input_ids.gpu.device)

    def _masked_attention(self, zipar: list[_ZipARRow], prefix: int) -> MaskedAttention:
        """Each ZipAR query sees the request's cached tokens (this forward's included) whose raster
        position is <= its own, except stand-ins other than itself; the class token is seen by all."""
        return masked_attention_for(self, [(z.row, lambda q, kv, z=z: _schedule_visibility(z.schedule, prefix)[q][:, kv])
                                           for z in zipar])

    # -- sampling --------------------------------------------------------------------------------
    def _sample(self, logits, spec_decode_metadata):
        if logits is not None and (order := self._family_order()) is not None:
            return order.sample(self, logits)
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
        # vLLM's sampler takes one row per request (each request's first) and draws for all of them,
        # ZipAR requests included, even when only ZipAR requests are in the batch: a seeded
        # request's generator then advances the same way whatever shares its batch. ZipAR rows are
        # then drawn by `_zipar_tokens`.
        first = torch.tensor([r.start for r in rows], device=logits.device)
        output = super()._sample(logits[first], None)
        emitted = self._zipar_tokens(layout.zipar, logits[:, :k], guided) if layout.zipar else {}
        emitted.update(self._sjd_tokens(layout.sjd, logits[:, :k]))
        width = max(len(t) for t in emitted.values())
        ids = torch.full((len(rows), width), -1, dtype=torch.int32)
        ids[:, :1] = output.sampled_token_ids[:, :1].cpu()
        for row, tokens in emitted.items():
            ids[row, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
        if guided is not None:
            ids[guided[1]] = ids[guided[0]]
        output.sampled_token_ids = ids.to(self.device)
        if output.logprobs_tensors is not None and width > 1:
            # One logprobs row per output slot, as parse_output expects; only column 0 is ever valid
            # for a request that asked for logprobs (ZipAR requests cannot).
            lt = output.logprobs_tensors
            output.logprobs_tensors = lt._replace(logprob_token_ids=lt.logprob_token_ids.repeat_interleave(width, 0),
                                                  logprobs=lt.logprobs.repeat_interleave(width, 0),
                                                  selected_token_ranks=lt.selected_token_ranks.repeat_interleave(width, 0))
        return output

    def _sjd_tokens(self, images: dict[str, list["_SJDRow"]], logits: torch.Tensor) -> dict[int, list[int]]:
        """Verify each SJD image's drafts against its (guided) targets; -> committed tokens of the
        stream that samples (the caller copies them to an uncond half), and carry the Jacobi tail."""
        out = {}
        for image_id, rows in images.items():
            lead = rows[0]
            params = self.requests[self.input_batch.req_ids[lead.row]].sampling_params
            p = target_probs(logits[lead.logits], params.temperature, max(params.top_k or 0, 0), params.top_p)
            state = self._sjd_states[image_id]
            decoding = lead.info.decoding
            relaxed = None if decoding.relaxed_delta is None else (
                self._latent_neighbours(decoding.relaxed_neighbours), decoding.relaxed_delta)
            out[lead.row], state.carried = verify(p, state.current, self.input_batch.generators.get(lead.row), relaxed)
        return out

    def _latent_neighbours(self, k: int | None) -> torch.Tensor:
        """Each image code's k nearest codes in the VQ's latent space (relaxed SJD acceptance); k
        defaults to LlamaGen/LANTERN's share, 1000 of 16384 codes."""
        cfg = self.model_config.hf_config
        k = min(k or max(1, round(cfg.codebook_size * 1000 / 16384)), max(1, cfg.codebook_size - 1))
        if self._neighbours is None:
            self._neighbours = {}
        if k not in self._neighbours:
            if len(self._neighbours) >= 4:  # clients choose k: keep a few tables, not one per k ever asked
                self._neighbours.pop(next(iter(self._neighbours)))
            import os

            from safetensors.torch import load_file

            from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS

            codebook = load_file(os.path.join(self.model_config.model, VQ_WEIGHTS))["quantize.embedding.weight"]
            if cfg.vq.get("codebook_l2_norm", True):
                codebook = torch.nn.functional.normalize(codebook.float(), dim=-1)
            self._neighbours[k] = latent_neighbours(codebook, k).to(self.device)
        return self._neighbours[k]

    def _zipar_tokens(self, zipar: list[_ZipARRow], logits: torch.Tensor, guided) -> dict[int, list[int]]:
        """This forward's emitted tokens per ZipAR request (batch row): a sample per predicting row,
        in order, then the stand-in if its schedule starts a row next forward. One batched draw for
        all of them; an uncond half gets its cond half's tokens (copied by the caller)."""
        uncond = set(guided[1]) if guided is not None else set()
        drawn = [z for z in zipar if z.row not in uncond]
        rows = torch.cat([torch.arange(z.logits.start, z.logits.stop) for z in drawn]).to(logits.device)
        settings, generators, at = [], [], 0
        for z in drawn:
            params = self.requests[self.input_batch.req_ids[z.row]].sampling_params
            n = z.logits.stop - z.logits.start
            settings += [(params.temperature, max(params.top_k or 0, 0), params.top_p)] * n
            if (g := self.input_batch.generators.get(z.row)) is not None:
                generators.append((slice(at, at + n), g))
            at += n
        temperature, top_k, top_p = (torch.tensor(c, device=logits.device) for c in zip(*settings))
        tokens = sample_rows(logits[rows].float(), temperature, top_k, top_p, generators).tolist()
        out, at = {}, 0
        for z in drawn:
            n = z.logits.stop - z.logits.start
            mine, at = tokens[at:at + n], at + n
            emitted = z.schedule.emitted(z.step)
            last = z.schedule.sequence[emitted.stop - 1]
            if last.stand_in:
                where = z.schedule.raster_order[last.copy_of]
                history = self.requests[self.input_batch.req_ids[z.row]].output_token_ids
                mine.append(history[where] if where < len(history) else mine[where - emitted.start])
            out[z.row] = mine
        return out


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
