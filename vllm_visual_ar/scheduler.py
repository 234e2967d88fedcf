"""vLLM scheduler for image requests: classifier-free-guidance pairs advance in lockstep, and each
request is stepped by its strategy (`samplers/`), which this scheduler asks and never names.

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
- Strategies (`samplers/strategy.py::Strategy`, one object per request). Its strategy says whether a
  request can run, what one stream reserves (`footprint`: the tokens vLLM appends, which become its
  max_tokens, its widest step and look-ahead), what to do before a step that runs it (speculative-
  token slots the runner fills, which vLLM accounts as speculative decoding and rolls back; a
  rewind), which phase (model) its next forward runs in, and what the frontend is shown of the
  tokens a step appended; a runner half's report of the step (`StrategyRunner.report`, on the
  runner's output) reaches it before vLLM appends the tokens. A step runs one phase, alternating between the phases that have work;
  new requests enter in their entry phase. Both halves of a pair get the same answers.
- Load-aware widths (`samplers/load.py`). A strategy that can run a step narrower than its window
  says so (`width_choice`); before each step the scheduler picks every such image's width
  from a cost model of step time against what the step runs, fitted on the steps this engine has run, and
  reports it in the step's output (`requests.step_width`); a choice that holds every image at width 1
  stands for a few steps of the same batch (`WidthPolicy.holds`), in which the images it held are
  neither asked nor prepared again: their preparation at width 1 stands (`Strategy.before_step`). A strategy whose schedule is fixed for the
  whole image says which windows it could run at (`window_options`); the scheduler picks one when it
  admits the image and restarts the image's requests with it, before their first forward. A strategy
  whose rows start at the scheduler's word offers each start before a step
  (`row_start`), and the scheduler starts it where the step gains from it (`_start_rows`).
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, replace

from vllm.logger import init_logger
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs
from vllm.v1.request import Request, RequestStatus

from vllm_visual_ar import phase_kv
from vllm_visual_ar.admission import Need, admit, cannot_fit, footprint_need
from vllm_visual_ar.requests import (IMAGE_WINDOW_KEY, STEP_DRAFTS_KEY, STEP_WIDTH_KEY, Decoding, image_request_info,
                                     set_decoding)
from vllm_visual_ar.samplers import strategy_for
from vllm_visual_ar.samplers.load import StepShape, WidthChoice, WidthPolicy, cap_to_budget
from vllm_visual_ar.samplers.strategy import RUNNER_REPORTS, Strategy

logger = init_logger(__name__)


@dataclass
class _Tracked:
    """A request the scheduler runs: its guidance pair, its strategy and what it reserves for its
    whole life."""
    request: Request
    pair_key: str | None
    strategy: Strategy
    need: Need
    widest_step: int
    route: tuple = ()  # the phases it visits, in order (`phase_kv.py`); empty: no phases

    def __post_init__(self):
        # Most requests are shown to the frontend as vLLM appended them, choose no width (their
        # strategy cannot, or they are not load-aware), start no rows and report nothing of a step:
        # skip those calls for them (made for every request in every step).
        kind = type(self.strategy)
        self.rewrites_output = self.strategy.rewrites_output
        self.prepares = kind.before_step is not Strategy.before_step
        self.chooses_width = kind.width_choice is not Strategy.width_choice and bool(self.strategy.decoding.load_aware)
        self.starts_rows = kind.row_start is not Strategy.row_start
        self.may_run_rows = kind.runs_rows is not Strategy.runs_rows
        self.phased = kind.phase is not Strategy.phase
        self.reports_width = kind.step_width is not Strategy.step_width
        self.reports_drafts = kind.step_drafts is not Strategy.step_drafts
        self.reports_window = kind.image_window is not Strategy.image_window


class VisualARScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        phase_kv.register()  # before vLLM builds its KV cache manager
        super().__init__(*args, **kwargs)
        # vLLM's KV cache groups: (phase, block size) each. A model whose phases run different
        # layers has groups per phase; a request holds blocks in its phase's groups only.
        self._kv_layout = phase_kv.group_layout(self.kv_cache_config)
        expected = phase_kv.expected_layout(getattr(self.vllm_config.model_config.hf_config, "kv_phases", {}),
                                            self.block_size)
        if sorted(self._kv_layout, key=repr) != sorted(expected, key=repr):
            # The frontends' pre-check (`admission.image_need`) assumes vLLM's grouping rule.
            logger.warning("visual_ar: KV cache groups %s differ from the expected %s; the frontend's "
                           "fit check may be off, the scheduler uses the real ones", self._kv_layout, expected)
        self._pair_members: dict[str, set[str]] = defaultdict(set)  # image_id -> request ids
        self._finished_here: list[Request] = []  # finished by this scheduler; the frontend must hear of it
        self._tracked: dict[str, _Tracked] = {}
        self._freed: dict[str, _Tracked] = {}  # freed this step; their last tokens still go out
        self._overtaken: dict[str, int] = {}  # waiting group key -> times a later group was admitted first
        self._last_phase = None  # the phase the previous step ran
        self._batch_changes = 0  # requests admitted or freed so far: a step's batch is (this, its phase)
        self._width_policy = WidthPolicy()  # load-aware widths: a cost model of the steps run, and the choice
        self._at_width_1: set[str] = set()  # requests the last choice of widths gave width 1
        # id(scheduler output) -> (start of its schedule, its StepShape); then the last step updated,
        # which the cost models see when the next step starts (`_observe_last_step`)
        self._timing: dict[int, tuple] = {}
        self._last_step: tuple | None = None
        seqs = min(self.max_num_running_reqs, self.max_num_active_reqs)
        # An idle engine's room (the block pool keeps one null block).
        self._room = Need(seqs, self.max_num_scheduled_tokens, self.kv_cache_manager.block_pool.num_gpu_blocks - 1)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _pair_key(self, request: Request) -> str | None:
        """The image id of a guided request (parsed once per request: it is asked every step)."""
        if (tracked := self._tracked.get(request.request_id)) is not None:
            return tracked.pair_key
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
        if problem := self._start(request, info):
            partners = list(self._pair_members.pop(info.image_id, ())) if info is not None and info.guided else []
            return self._fail(partners + [request.request_id], problem)
        if info is None:
            return
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

    def _start(self, request: Request, info) -> str | None:
        """Ask the request's strategy whether it can run and what it reserves; -> why not, or None.
        The strategy's footprint fixes the tokens vLLM appends (its max_tokens)."""
        decoding = info.decoding if info is not None else Decoding()
        config = self.vllm_config.model_config.hf_config
        cls = strategy_for(config, decoding)
        if problem := cls.problem(config, decoding):
            return problem
        strategy = cls(config, decoding, info.size if info is not None else None)
        try:
            if problem := strategy.start(request):
                return problem
        except ValueError as e:  # e.g. a hand-made request's size that the model does not make
            return str(e)
        if info is not None and (problem := strategy.settings_problem(info)):
            return problem
        if cls.uses_spec_slots and self.vllm_config.speculative_config is not None:
            return (f"strategy {decoding.strategy!r} cannot run in an engine configured with another "
                    "speculative method")
        footprint = strategy.footprint(request.max_tokens)
        if request.num_prompt_tokens + footprint.tokens > self.max_model_len:
            return (f"strategy {decoding.strategy!r} needs max_model_len >= "
                    f"{request.num_prompt_tokens + footprint.tokens} (it is {self.max_model_len})")
        request.max_tokens = footprint.tokens
        spec = self.vllm_config.speculative_config
        need = footprint_need(request.num_prompt_tokens, footprint, self._kv_layout,
                              spec.num_speculative_tokens if spec is not None else None)
        pair_key = info.image_id if info is not None and info.guided else None
        self._tracked[request.request_id] = _Tracked(request, pair_key, strategy, need, footprint.widest_step,
                                                     tuple(footprint.phase_tokens or ()))
        return None

    def make_spec_decoding_stats(self, spec_decoding_stats, *args, **kwargs):
        # vLLM's spec-decoding metrics are sized by its speculative config, which strategies that
        # use speculative slots of their own do not have; the frontends count their acceptance per
        # image (the strategy's statistics: generator stats, /metrics).
        if self.vllm_config.speculative_config is None:
            return None
        return super().make_spec_decoding_stats(spec_decoding_stats, *args, **kwargs)

    def _fail(self, request_ids: list[str], reason: str) -> None:
        logger.error("visual_ar: rejecting %s: %s", request_ids, reason)
        self._finished_here += super().finish_requests(request_ids, RequestStatus.FINISHED_ERROR)

    def _free_request(self, request: Request, delay_free_blocks: bool = False):
        phase_kv.forget(request.request_id)
        key = self._pair_key(request)
        if (tracked := self._tracked.pop(request.request_id, None)) is not None:
            self._freed[request.request_id] = tracked
        self._batch_changes += 1
        if key is not None:
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
        timing = self._timing.pop(id(scheduler_output), None)
        for req_id, report in (getattr(model_runner_output, RUNNER_REPORTS, None) or {}).items():
            if (tracked := self._tracked.get(req_id)) is not None:
                tracked.strategy.runner_report(tracked.request, report)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        for eco in (o for group in outputs.values() for o in group.outputs):
            tracked = self._tracked.get(eco.request_id) or self._freed.get(eco.request_id)
            if tracked is None:
                continue
            strategy, request = tracked.strategy, tracked.request
            if tracked.rewrites_output:
                eco.new_token_ids = strategy.frontend_tokens(request, eco.new_token_ids)
            last = eco.finish_reason is not None
            if not (tracked.reports_width or tracked.reports_drafts or tracked.reports_window and last) or (
                    eco.kv_transfer_params is not None):
                continue
            step = {}
            if tracked.reports_width and (width := strategy.step_width(request)) is not None:
                step[STEP_WIDTH_KEY] = width
            if tracked.reports_drafts and (drafts := strategy.step_drafts(request)) is not None:
                step[STEP_DRAFTS_KEY] = drafts
            # the image's window: once, with its last tokens
            if last and tracked.reports_window and (window := strategy.image_window(request)) is not None:
                step[IMAGE_WINDOW_KEY] = window
            if step:
                eco.kv_transfer_params = step
        self._freed.clear()
        for request in self._finished_here:
            eco = outputs.setdefault(request.client_index, EngineCoreOutputs())
            eco.outputs.append(EngineCoreOutput(request_id=request.request_id, new_token_ids=[],
                                                finish_reason=request.get_finished_reason()))
        self._finished_here = []
        # A step is timed up to the start of the next, unless it left the engine with nothing to do
        # (the next may then come after an idle wait).
        self._last_step = timing if timing is not None and self.has_unfinished_requests() else None
        return outputs

    def _observe_last_step(self) -> None:
        """Give the cost models the last step's time: from the start of its `schedule` to the start
        of this one, the whole step as the engine's clients see it (vLLM's scheduling, the forward,
        the outputs' processing). Under load the work around the forward is a good part of a step
        on a small model (here 0.5 ms of a 4.4 ms one-token step with 16 images), and a decoding that
        takes fewer steps saves it: timed from the forward alone, wider steps were charged as if it
        did not count."""
        if self._last_step is not None:
            start, shape = self._last_step
            self._last_step = None
            self._width_policy.observe(shape, time.perf_counter() - start)

    # -- admission -------------------------------------------------------------------------------
    def _need(self, request: Request) -> Need:
        """What the request reserves for its whole life (its strategy's footprint, `admission.py`)."""
        return self._tracked[request.request_id].need

    def _held_by(self, request: Request) -> Need:
        """What a running request still holds back from the others: its step budget (its widest step
        is reserved up front, so vLLM never has to split one), and the KV blocks of its reservation
        not yet allocated."""
        tracked = self._tracked[request.request_id]
        pending = request.num_tokens_with_spec + request.num_output_placeholders - request.num_computed_tokens
        held = sum(not b.is_null for group in self.kv_cache_manager.coordinator.get_blocks(request.request_id)
                   for b in group)
        return Need(1, max(pending, tracked.widest_step), max(0, tracked.need.kv_blocks - held))

    def _admissible_groups(self) -> list[Request]:
        """Waiting requests that this step may admit: whole groups, chosen by `admission.admit`. An
        image admitted with a load-aware window may restart with a narrower one (`_choose_windows`),
        which frees room in the same step: admission then goes on with the groups left, so a wave
        that the policy gives its narrowest option is admitted at once, not a few images per step."""
        groups: dict[str, list[Request]] = {}
        for r in self.waiting:
            groups.setdefault(self._pair_key(r) or r.request_id, []).append(r)
        whole = {key: g for key, g in groups.items() if self._pair_key(g[0]) is None or len(g) == 2}
        self._overtaken = {k: n for k, n in self._overtaken.items() if k in whole}
        if not whole:  # most steps under load: nothing to weigh the running requests' room against
            return []
        room = Need(self._room.sequences, self.max_num_scheduled_tokens,
                    self.kv_cache_manager.block_pool.get_num_free_blocks())
        for r in self.running:
            room = room - self._held_by(r)
        chosen: list[list[Request]] = []
        # Where nothing ran before this admission, the last step (the cost model's picture of the
        # step they join) was another workload's: the step then holds no wide streams but those of
        # the images admitted to it that kept their own setting.
        wide = bool(self.running)
        while whole:
            needs = [(key, self._group_need(g)) for key, g in whole.items()]
            keys = admit(needs, room, self._overtaken, self.max_num_running_reqs)
            if not keys:
                break
            new = [whole.pop(key) for key in keys]
            restarted, wide = self._choose_windows(new, list(whole.values()), chosen, wide)
            room = room - sum((self._group_need(g) for g in new), Need())  # what they hold now
            chosen += new
            if not restarted:  # the room left is what the groups still waiting did not fit in
                break
        return [r for g in chosen for r in g]

    def _group_need(self, group: list[Request]) -> Need:
        return sum((self._need(r) for r in group), Need())

    def _choose_windows(self, groups: list[list[Request]], queued: list[list[Request]],
                        joined: list[list[Request]], wide: bool) -> tuple[bool, bool]:
        """Images admitted now whose strategy fixes its schedule for the whole image and is load-aware
        (`Strategy.window_options`) get the window the policy picks against the step they join (those
        with the same options together; `joined`: groups admitted to it before them; `wide`: whether
        it may hold other wide streams); one that gets another than its own restarts with it (a
        narrower reservation than admitted). -> (whether any restarted, whether the step may now hold
        wide streams). Admission reserves each image's own window, so the policy also weighs the
        images still queued (up to the sequence limit), which the narrowest option lets into the step
        and wider options keep out. Were the first few to weigh only themselves, they would take their rows,
        and their reservations would hold the rest of the wave back."""
        asking: dict[tuple, list[list[Request]]] = {}
        for g in groups:
            if options := self._tracked[g[0].request_id].strategy.window_options(g[0]):
                asking.setdefault((tuple(options), len(g)), []).append(g)
        if not asking:
            return False, wide
        joined = [*joined, *groups]
        sequences = len(self.running) + sum(len(g) for g in joined)
        images = len({self._pair_key(r) or r.request_id for r in self.running}) + len(joined)
        waiting = (0, 0)  # sequences, images
        for g in queued:
            if sequences + waiting[0] + len(g) > self.max_num_running_reqs:
                break
            waiting = (waiting[0] + len(g), waiting[1] + 1)
        restarted = False
        for (options, streams), same in asking.items():
            chosen = self._width_policy.options(list(options), streams, len(same), sequences, images, waiting,
                                                wide)
            for g, index in zip(same, chosen):
                if index < len(options) - 1:
                    restarted |= self._restart(g, options[index])
                wide |= options[index].wide
        return restarted, wide

    def _restart(self, group: list[Request], option) -> bool:
        """Start an admitted image's requests again (before their first forward) with another window
        (or the decoding the option names); where the strategy refuses it, they keep their own.
        -> whether any did."""
        restarted = False
        for r in group:
            info = image_request_info(r.sampling_params)
            decoding = option.decoding or replace(info.decoding, window=option.window)
            tracked, max_tokens = self._tracked.pop(r.request_id), r.max_tokens
            r.max_tokens = r.sampling_params.max_tokens  # the image's tokens; the new footprint sets it again
            if problem := self._start(r, replace(info, decoding=decoding)):
                logger.warning("visual_ar: load-aware choice %s refused for %s: %s", decoding, r.request_id, problem)
                self._tracked[r.request_id], r.max_tokens = tracked, max_tokens
                continue
            set_decoding(r.sampling_params, decoding)  # what the model runner reads
            restarted = True
        return restarted

    def _phase_step(self, admitted: list[Request]) -> tuple[list[Request], list[Request]]:
        """One phase per step (a phase is the model a forward runs), alternating between the phases
        that have work; each running request of the phase is prepared by its strategy. -> (running
        requests held out of this step, the admitted ones that may start)."""
        phase_of = {}
        for r in self.running:
            tracked = self._tracked[r.request_id]
            phase_of[r.request_id] = own = tracked.strategy.phase(r) if tracked.phased else None
            if tracked.route:
                phase_kv.set_phase(r.request_id, own, tracked.route)
        entry_of = {r.request_id: type(self._tracked[r.request_id].strategy).entry_phase for r in admitted}
        present = set(phase_of.values()) | set(entry_of.values())
        if len(present) > 1:
            present.discard(self._last_phase)
        phase = self._last_phase = min(present, key=repr) if present else None
        for r in admitted:  # a resumed request (preempted) may be past its entry phase
            tracked = self._tracked[r.request_id]
            phase_kv.set_phase(r.request_id, tracked.strategy.phase(r), tracked.route)
        held = [r for r in self.running if phase_of[r.request_id] != phase]
        starting = [r for r in admitted if entry_of[r.request_id] == phase]
        choices: dict[str, tuple] = {}  # image (pair key or request id) -> (width choice, its requests)
        others: list[Request] = []
        batch = (self._batch_changes, phase)
        holding = self._width_policy.holds(batch)  # the last choice held every image at width 1 and stands
        kept: list[tuple[Request, _Tracked, str]] = []  # held at width 1 by that choice

        def ask(r: Request, tracked: _Tracked, key: str | None) -> None:
            if key in choices:  # the partner of an image already asked: its streams feed the same tokens
                choices[key][1].append(r)
            elif key is not None and (choice := tracked.strategy.width_choice(r)) is not None:
                choices[key] = (choice, [r])
            else:
                if tracked.prepares:
                    tracked.strategy.before_step(r)
                others.append(r)

        for r in self.running:
            if phase_of[r.request_id] != phase:
                continue
            tracked = self._tracked[r.request_id]
            key = (tracked.pair_key or r.request_id) if tracked.chooses_width else None
            if key is not None and holding and r.request_id in self._at_width_1:
                kept.append((r, tracked, key))  # prepared at width 1 by that choice: nothing to ask or prepare
            else:
                ask(r, tracked, key)
        if choices:
            for held_one in kept:  # an image the choice did not hold (past its prompt since) asks: all are asked
                ask(*held_one)
            widths = self._widths(list(choices.values()), others, starting, batch)
            for r, width in widths.items():
                self._tracked[r.request_id].strategy.before_step(r, width)
            self._at_width_1 = {r.request_id for r, width in widths.items() if width == 1}
        running = [r for r in self.running if phase_of[r.request_id] == phase]
        if any(self._tracked[r.request_id].starts_rows for r in running):
            self._start_rows(running, starting)
        return held, starting

    def _start_rows(self, running: list[Request], starting: list[Request]) -> None:
        """Images whose rows start at the scheduler's word (`Strategy.row_start`) start one in this
        step where the policy finds that the step gains from it (`load.WidthPolicy.row_starts`),
        against the step as it stands (both halves of a pair alike)."""
        offers: dict[str, tuple] = {}  # image -> (its RowStart, its requests)
        for r in running:
            key = self._pair_key(r) or r.request_id
            if key in offers:
                offers[key][1].append(r)
            elif (offer := self._tracked[r.request_id].strategy.row_start(r)) is not None:
                offers[key] = (offer, [r])
        if not offers:
            return
        fed = [max(1, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens) for r in running]
        drafts = sum(len(r.spec_token_ids) for r in running)
        sequences = len(running) + len(starting)
        tokens = sum(fed) + sum(r.num_prompt_tokens for r in starting)
        step = self._shape(sequences, drafts, tokens,
                           [*zip(running, fed), *((r, r.num_prompt_tokens) for r in starting)])
        others = {self._pair_key(r) or r.request_id for r in running} - offers.keys()
        chosen = self._width_policy.row_starts([replace(o, streams=len(rs)) for o, rs in offers.values()], step,
                                               len(others))
        for (_, rs), start in zip(offers.values(), chosen):
            for r in rs if start else ():
                self._tracked[r.request_id].strategy.start_row(r)

    def _widths(self, images: list[tuple], others: list[Request], starting: list[Request],
                batch: tuple) -> dict[Request, int]:
        """The width of each load-aware image this step (both halves of a pair get their image's):
        the policy's (`load.WidthPolicy`), then narrowed to the step budget left by the other requests
        and the prompts starting."""
        fed = [max(1, r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens) for r in others]
        pending = sum(fed) + sum(r.num_prompt_tokens for r in starting)
        streams = [len(rs) for _, rs in images]
        drafts = [len(r.spec_token_ids) for r in others]
        sequences = len(others) + len(starting) + sum(streams)
        wide = sum(n > 1 and r.num_output_tokens > 0 for n, r in zip(fed, others))
        narrow = StepShape(sequences, sum(drafts), wide, pending + sum(streams) - sequences - sum(drafts))
        other_images = {self._pair_key(r) or r.request_id for r in others}
        choices = [WidthChoice(c.ceiling, c.slope, n) for (c, _), n in zip(images, streams)]
        chosen = self._width_policy.widths(choices, narrow, len(other_images), batch)
        chosen = cap_to_budget(chosen, streams, self.max_num_scheduled_tokens - pending - sum(streams))
        return {r: w for (_, rs), w in zip(images, chosen) for r in rs}

    def schedule(self, *args, **kwargs) -> SchedulerOutput:
        start = time.perf_counter()
        self._observe_last_step()
        waiting = list(self.waiting)
        admitted = self._admissible_groups()
        held_running, admitted = self._phase_step(admitted)
        if held_running:
            held_set = set(held_running)
            self.running = [r for r in self.running if r not in held_set]
        admitted_set = set(admitted)
        self._batch_changes += bool(admitted)
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
        if len(self._timing) > 8:  # outputs never updated (e.g. a failed step): keep only the recent ones
            self._timing.clear()
        drafts = output.scheduled_spec_decode_tokens
        self._timing[id(output)] = (start, self._shape(
            len(output.num_scheduled_tokens), sum(len(d) for d in drafts.values()), output.total_num_scheduled_tokens,
            [(self.requests[rid], n) for rid, n in output.num_scheduled_tokens.items()]))
        return output

    def _shape(self, sequences: int, drafts: int, tokens: int, fed: list[tuple[Request, int]]) -> StepShape:
        """The step as the cost models see it; `fed`: (request, tokens it feeds), its prompt's included."""
        wide = context = other_wide = other_tokens = 0
        for r, n in fed:
            if n == 1:
                continue
            tracked = self._tracked.get(r.request_id)
            if r.num_output_tokens and tracked is not None and tracked.may_run_rows and tracked.strategy.runs_rows(r):
                context += r.num_computed_tokens
            else:
                other_tokens += n - 1  # a prompt, or drafts on vLLM's causal path
                other_wide += r.num_output_tokens > 0
            wide += r.num_output_tokens > 0  # streams past their prompt feeding several tokens
        return StepShape(sequences, drafts, wide, tokens - sequences - drafts, context, other_wide, other_tokens)

    def _check_pairs(self, output: SchedulerOutput) -> None:
        """Both halves of a pair in every step, with the same tokens once past their prompts (a text
        model's cond and uncond prompts differ in length)."""
        scheduled = output.num_scheduled_tokens
        for members in self._pair_members.values():
            if len(members) != 2:
                continue
            a, b = members
            n, m = scheduled.get(a), scheduled.get(b)
            if n == m:
                continue
            prefill = any(self.requests[r].num_output_tokens == 0 for r in members)
            if n is None or m is None or not prefill:
                raise RuntimeError(f"guidance pair split: {a} scheduled {n or 0} tokens, its partner {b} {m or 0}")
