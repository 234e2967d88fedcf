"""vLLM scheduler for image requests: classifier-free-guidance pairs advance in lockstep.

A guided image is two requests (cond, uncond; see `requests.py`) whose logits the runner mixes in
every step, so both must be scheduled together or not at all. vLLM's scheduler admits, budgets and
preempts request by request, so this subclass wraps it rather than rewriting it:

- Admission. Before each `schedule()`, only whole groups (a pair, or an unguided request) stay in
  the waiting queue, and only those that fit: sequence slots, the token budget, and the KV blocks
  for the *whole* image. An image's length is fixed (max_tokens), so reserving its blocks up front
  means running requests never need preemption, which would split a pair. Which waiting groups
  go first is `admission.admit`'s bounded-unfairness rule; a group that could not fit even in an
  idle engine is failed when it is complete. A half whose partner has not arrived yet waits.
- Abort. Aborting one half aborts its partner; the frontend is told in the next output.
- Bad pairs (malformed `visual_ar` args, a third request or a second "cond" under one image id,
  halves with different max_tokens) finish with an error instead of waiting forever.
- Every step checks that no pair was split; a split is a bug and raises.
- ZipAR requests (`samplers/zipar.py`) append more tokens than the image has (stand-ins) in
  generation order, several per step. This scheduler lets vLLM count them as ordinary output tokens
  (so KV slots, blocks and frees stay vLLM's) and rewrites what goes to the frontend: stand-ins
  dropped, image tokens released in raster order as the raster prefix grows (at least one per
  step, since the top unfinished row advances every step).
- A family that decodes in its own order (VAR: one forward per scale, `samplers/next_scale.py`)
  supplies a scheduling object: what a request must look like, what one stream reserves, and how
  many speculative-token slots its next forward needs (the runner fills them and rejects none).
- SJD requests (`samplers/sjd.py`) go through vLLM's speculative-decoding accounting: before each
  step the scheduler gives each one `min(window, tokens left) - 1` spec-token slots (the runner fills
  them with its Jacobi drafts), and after it vLLM rolls back the KV of rejected drafts, counting the
  committed tokens the runner returns as accepted + 1. Both halves of a guided pair get the same
  slots, so their drafts and acceptance stay identical.
"""
from __future__ import annotations

import math
from collections import defaultdict

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_visual_ar.admission import Need, admit, cannot_fit, stream_need
from vllm_visual_ar.requests import image_request_info
from vllm_visual_ar.samplers import family_decoding
from vllm_visual_ar.samplers.sjd import draft_slots
from vllm_visual_ar.samplers.zipar import ZipARSchedule, zipar_schedule

logger = init_logger(__name__)


class _ZipARStream:
    """A ZipAR request's output in flight: vLLM-order tokens seen so far, raster tokens released."""

    def __init__(self, schedule: ZipARSchedule, request: Request):
        self.schedule, self.request = schedule, request
        self.raster_of = [-1 if e.stand_in else e.raster for e in schedule.sequence]
        self.codes: dict[int, int] = {}  # raster index -> token, not yet released
        self.seen = 0      # vLLM output tokens looked at
        self.released = 0  # raster prefix already sent to the frontend

    def release(self) -> list[int]:
        outputs = self.request.output_token_ids
        for i in range(self.seen, len(outputs)):
            if self.raster_of[i] >= 0:
                self.codes[self.raster_of[i]] = outputs[i]
        self.seen = len(outputs)
        out = []
        while self.released in self.codes:
            out.append(self.codes.pop(self.released))
            self.released += 1
        return out


class VisualARScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pair_members: dict[str, set[str]] = defaultdict(set)  # image_id -> request ids
        self._finished_here: list[Request] = []  # finished by this scheduler; the frontend must hear of it
        self._zipar: dict[str, _ZipARStream] = {}
        self._sjd_window: dict[str, int] = {}  # request id -> SJD window
        self._zipar_done: dict[str, _ZipARStream] = {}  # freed this step; their last tokens still go out
        self._overtaken: dict[str, int] = {}  # waiting group key -> times a later group was admitted first
        order = family_decoding(self.vllm_config.model_config.hf_config, 0)
        self._order = order(self.vllm_config.model_config.hf_config) if order is not None else None
        self._last_phase = None  # the phase the previous step ran (families decoding in phases)
        seqs = min(self.max_num_running_reqs, self.max_num_active_reqs)
        # An idle engine's room (the block pool keeps one null block).
        self._room = Need(seqs, self.max_num_scheduled_tokens, self.kv_cache_manager.block_pool.num_gpu_blocks - 1)

    # -- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def _pair_key(request: Request) -> str | None:
        try:
            info = image_request_info(request.sampling_params)
        except ValueError:
            return None
        return info.image_id if info is not None and info.guided else None

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        try:
            info = image_request_info(request.sampling_params)
        except ValueError as e:
            # Its partner, if it names one, can never be paired now: fail it too.
            raw = (request.sampling_params.extra_args or {}).get("visual_ar")
            key = str(raw.get("image_id")) if isinstance(raw, dict) and "image_id" in raw else None
            partners = list(self._pair_members.pop(key, ())) if key is not None else []
            return self._fail(partners + [request.request_id], str(e))
        if self._order is not None:
            if problem := self._order.problem(request):
                partners = list(self._pair_members.pop(info.image_id, ())) if info is not None and info.guided else []
                return self._fail(partners + [request.request_id], problem)
        if info is None:
            return
        start = {"zipar": self._start_zipar, "sjd": self._start_sjd}.get(info.decoding.strategy)
        if start is not None and (problem := start(request, info.decoding.window)):
            partners = list(self._pair_members.pop(info.image_id, ())) if info.guided else []
            return self._fail(partners + [request.request_id], problem)
        if not info.guided:
            if problem := cannot_fit(self._need(request), self._room):
                self._fail([request.request_id], problem)
            return
        members = [self.requests[r] for r in self._pair_members[info.image_id]]
        infos = [image_request_info(m.sampling_params) for m in members]
        if info.role in [i.role for i in infos] or any(i.decoding != info.decoding for i in infos) or any(
                m.max_tokens != request.max_tokens for m in members):
            bad = [m.request_id for m in members] + [request.request_id]
            del self._pair_members[info.image_id]
            return self._fail(bad, f"image {info.image_id!r} needs one cond and one uncond request "
                                   "with the same max_tokens and decoding strategy")
        self._pair_members[info.image_id].add(request.request_id)
        if members and (problem := cannot_fit(self._need(members[0]) + self._need(request), self._room)):
            self._fail([m.request_id for m in members] + [request.request_id], problem)

    def _not_whole_image(self, request: Request, strategy: str) -> str | None:
        """ZipAR and SJD decode whole images and return no logprobs; -> what is wrong, or None."""
        cfg = self.vllm_config.model_config.hf_config
        grid = getattr(cfg, "image_grid", None)
        if grid is None:
            return f"strategy {strategy!r} needs an image model, not {type(cfg).__name__}"
        if request.max_tokens != grid * grid:
            return f"strategy {strategy!r} generates whole images: max_tokens must be {grid * grid}"
        if request.sampling_params.logprobs is not None:
            return f"strategy {strategy!r} does not return logprobs"
        return None

    def _start_sjd(self, request: Request, window: int) -> str | None:
        if problem := self._not_whole_image(request, "sjd"):
            return problem
        if self.vllm_config.speculative_config is not None:
            return "strategy 'sjd' cannot run in an engine configured with another speculative method"
        # A window longer than the image verifies no more than the image: the longest useful window.
        self._sjd_window[request.request_id] = min(window, request.max_tokens)
        return None

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, **kwargs):
        # vLLM's spec-decoding metrics are sized by its speculative config, which SJD does not use;
        # SJD's acceptance is counted per image by the plugin (generator stats, /metrics).
        if self.vllm_config.speculative_config is None:
            return None
        return super().make_spec_decoding_stats(spec_decoding_stats, *args, **kwargs)

    def _start_zipar(self, request: Request, window: int) -> str | None:
        """Track a ZipAR request; -> why it cannot run, or None."""
        if problem := self._not_whole_image(request, "zipar"):
            return problem
        grid = self.vllm_config.model_config.hf_config.image_grid
        schedule = zipar_schedule(grid, grid, window)
        if request.num_prompt_tokens + len(schedule.sequence) > self.max_model_len:
            return (f"ZipAR with window {window} needs max_model_len >= "
                    f"{request.num_prompt_tokens + len(schedule.sequence)} (it is {self.max_model_len})")
        if schedule.window < grid:  # w >= W is raster order: nothing to track
            request.max_tokens = len(schedule.sequence)  # image tokens plus stand-ins, as vLLM counts them
            self._zipar[request.request_id] = _ZipARStream(schedule, request)
        return None

    def _fail(self, request_ids: list[str], reason: str) -> None:
        logger.error("visual_ar: rejecting %s: %s", request_ids, reason)
        self._finished_here += super().finish_requests(request_ids, RequestStatus.FINISHED_ERROR)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        self._sjd_window.pop(request.request_id, None)
        if (stream := self._zipar.pop(request.request_id, None)) is not None:
            self._zipar_done[request.request_id] = stream
        if (key := self._pair_key(request)) is not None:
            members = self._pair_members.get(key)
            if members is not None:
                members.discard(request.request_id)
                if not members:
                    del self._pair_members[key]
        return super()._free_request(request, delay_free_blocks)

    def _partner_id(self, request_id: str) -> str | None:
        request = self.requests.get(request_id)
        key = self._pair_key(request) if request is not None else None
        others = self._pair_members.get(key, set()) - {request_id} if key is not None else set()
        return next(iter(others), None)

    # -- abort both halves -----------------------------------------------------------------------
    def finish_requests(self, request_ids, finished_status: RequestStatus) -> list[Request]:
        if request_ids is None or finished_status != RequestStatus.FINISHED_ABORTED:
            return super().finish_requests(request_ids, finished_status)
        asked = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        partners = {p for rid in asked if (p := self._partner_id(rid)) is not None} - asked
        finished = super().finish_requests(asked | partners, finished_status)
        self._finished_here += [r for r in finished if r.request_id in partners]
        return finished

    def update_from_output(self, scheduler_output, model_runner_output) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for eco in (o for group in outputs.values() for o in group.outputs):
            stream = self._zipar.get(eco.request_id) or self._zipar_done.get(eco.request_id)
            if stream is not None:
                eco.new_token_ids = stream.release()
        self._zipar_done.clear()
        for request in self._finished_here:
            eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=request.get_finished_reason()))
        self._finished_here = []
        return outputs

    # -- admission -------------------------------------------------------------------------------
    def _widest_step(self, request: Request) -> int:
        """Tokens of the request's widest step: ZipAR's widest forward and SJD's window are reserved
        up front, so vLLM never has to split one (a partial ZipAR forward would break its schedule)."""
        if self._order is not None:
            return self._order.stream(self._decoding(request))[1]
        stream = self._zipar.get(request.request_id)
        if stream is not None:
            return stream.schedule.max_fed_per_forward
        return self._sjd_window.get(request.request_id, 1)

    @staticmethod
    def _decoding(request: Request):
        info = image_request_info(request.sampling_params)
        return info.decoding if info is not None else None

    def _need(self, request: Request) -> Need:
        """What the request reserves for its whole life (`admission.py`)."""
        spec = self.vllm_config.speculative_config
        lookahead = spec.num_speculative_tokens if spec is not None else self._sjd_window.get(request.request_id, 0)
        if self._order is not None:
            lookahead = self._order.stream(self._decoding(request))[2]
        return stream_need(request.num_prompt_tokens, request.max_tokens, self._widest_step(request), lookahead,
                           self.block_size)

    def _held_by(self, request: Request) -> Need:
        """What a running request still holds back from the others: its step budget, and the KV
        blocks of its reservation not yet allocated."""
        pending = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        blocks = self._need(request).kv_blocks - math.ceil(request.num_computed_tokens / self.block_size)
        return Need(1, max(pending, self._widest_step(request)), max(0, blocks))

    def _admissible_groups(self) -> list[Request]:
        """Waiting requests that this step may admit: whole groups, chosen by `admission.admit`."""
        groups: dict[str, list[Request]] = {}
        for r in self.waiting:
            groups.setdefault(self._pair_key(r) or r.request_id, []).append(r)
        whole = {key: g for key, g in groups.items() if self._pair_key(g[0]) is None or len(g) == 2}
        self._overtaken = {k: n for k, n in self._overtaken.items() if k in whole}
        room = Need(self._room.sequences, self.max_num_scheduled_tokens,
                    self.kv_cache_manager.block_pool.get_num_free_blocks())
        for r in self.running:
            room = room - self._held_by(r)
        needs = [(key, sum((self._need(r) for r in g), Need())) for key, g in whole.items()]
        return [r for key in admit(needs, room, self._overtaken, self.max_num_running_reqs) for r in whole[key]]

    def _give_spec_slots(self) -> None:
        """Spec-token slots for each running SJD request past its prompt; the runner fills them."""
        for request in self.running:
            window = self._sjd_window.get(request.request_id)
            if window is not None and request.num_computed_tokens >= request.num_prompt_tokens:
                request.spec_token_ids = [0] * draft_slots(window, request.max_tokens - request.num_output_tokens)

    def _phase_step(self, admitted: list[Request]) -> tuple[list[Request], list[Request]]:
        """A family that decodes in phases run by different models (CoDe: drafter, refiner) runs one
        phase per step, alternating between the phases that have work; new images enter in the entry
        phase. -> (running requests held out of this step, the admitted ones that may start)."""
        present = {self._order.phase(r) for r in self.running} | ({self._order.entry_phase} if admitted else set())
        if len(present) > 1:
            present.discard(self._last_phase)
        phase = self._last_phase = min(present) if present else self._order.entry_phase
        for r in self.running:
            if self._order.phase(r) == phase:
                self._order.prepare_step(r)
        held = [r for r in self.running if self._order.phase(r) != phase]
        return held, admitted if phase == self._order.entry_phase else []

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        self._give_spec_slots()
        waiting = list(self.waiting)
        admitted = self._admissible_groups()
        held_running = []
        if self._order is not None:
            held_running, admitted = self._phase_step(admitted)
            self.running = [r for r in self.running if r not in set(held_running)]
        admitted_set = set(admitted)
        held = [r for r in waiting if r not in admitted_set]
        self.waiting.remove_requests(waiting)
        for r in admitted:
            self.waiting.add_request(r)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            # Anything not admitted goes back in front, in its original order.
            self.waiting.prepend_requests(reversed(held))
            self.running += held_running
        self._check_pairs(output)
        return output

    def _check_pairs(self, output: SchedulerOutput) -> None:
        scheduled = output.num_scheduled_tokens
        for rid, n in scheduled.items():
            partner = self._partner_id(rid)
            if partner is not None and scheduled.get(partner) != n:
                raise RuntimeError(
                    f"guidance pair split: {rid} scheduled {n} tokens, its partner {partner} "
                    f"{scheduled.get(partner, 0)}")
