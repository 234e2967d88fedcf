"""A decoding strategy as one object: what vLLM's scheduler and the plugin's model runner ask of it.

The shape follows vLLM's speculative-decoding proposers (`v1/spec_decode/`) and diffusers'
schedulers: a strategy keeps its own state, answers a few questions and knows of the engine only
what it is handed. The engine subclasses (`vllm_visual_ar/scheduler.py`, `vllm_visual_ar/worker.py`)
name no strategy: they look a request's strategy up in the registry (`samplers/__init__.py`) and ask
it the questions below. Adding a strategy is a module under `samplers/` plus one registry entry.

Scheduler half, `Strategy`: one object per request (each guidance stream has its own), built from
the model config and the request's `Decoding`. It answers whether the model and the request can run
it, what one stream reserves (`footprint`: the same answer for the scheduler's admission and for
`admission.image_need`), the slots or rewind before a step, the phase a step runs (a phase per
model, when a strategy hands requests from one model to another), and what the frontend sees of the
tokens a step appended. The request format's own checks (`checked`, `fitted`) are class methods, so
`Decoding` validates through the same object.

Runner half, `StrategyRunner`: one object per model runner, holding what a strategy carries between
forwards. For token-by-token models the runner gives each half the rows of its requests in a
forward; the half answers with a `RowPlan` per row it rewrites (positions, the rows of logits it
reads, who sees whom, tokens written into speculative slots) and later turns the logits of those
rows, guidance already mixed by the runner, into the tokens each request appends. A strategy that is
a model family's own decoding order (config.decoding) runs every request of that model and answers
for the whole batch instead (`owns_batch`: `prepare_batch`, `sample_batch`), mixing guidance its own
way. A half whose scheduler half must learn more of a step than the tokens it appended reports it
(`report`, carried on the runner's output to `Strategy.runner_report`; ZipAR x SJD's per-row commits).

Raster order, the default, rewrites nothing unless its draws are coupled (`raster.py`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar, Hashable, Mapping, Sequence

import numpy as np
import torch

from vllm_visual_ar.families import ImageLayout, image_layout


# The attribute of vLLM's ModelRunnerOutput that carries the runner halves' reports of a step
# (request id -> `StrategyRunner.report`) to the scheduler.
RUNNER_REPORTS = "visual_ar_reports"


@dataclass(frozen=True)
class Footprint:
    """What one stream of an image reserves for its whole life."""
    tokens: int        # output tokens vLLM appends to it (its max_tokens: stand-ins and the like included)
    widest_step: int   # tokens of its widest forward, reserved up front so that no forward is split
    lookahead: int     # KV slots a step may write past its committed tokens (speculative slots)
    # For a model whose phases run different layers (`config.kv_phases`): the most tokens the stream
    # holds KV for in each phase's layers (`vllm_visual_ar/phase_kv.py`). None: every layer, every token.
    phase_tokens: Mapping[str, int] | None = None


@dataclass
class RowPlan:
    """How one request's forward departs from vLLM's plain one (offsets count its fed tokens)."""
    logits: Sequence[int] | None             # offsets whose logits the strategy reads, in order (None: DRAW_ONLY)
    positions: Sequence[int] | None = None   # each fed token's position, if not vLLM's contiguous ones
    # (query positions [n], key positions [length]) -> bool [n, length], True = seen; None: causal
    visible: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
    slot_tokens: Sequence[int] | None = None  # token ids written into the last fed tokens (speculative slots)


# The plan of a row whose forward is vLLM's own and whose one token the strategy draws (coupled draws).
DRAW_ONLY = RowPlan(logits=None)


class Step:
    """One forward as a strategy's runner half sees it: vLLM's batch, read only, and a builder of
    masked attention for rows whose queries see other than causally (`masked_attention.py`)."""

    def __init__(self, req_ids: Sequence[str], query_start: np.ndarray, computed: np.ndarray,
                 prompt_lens: np.ndarray, states: Mapping, generators: Mapping[int, torch.Generator],
                 device, info: Callable[[str], object], masked_attention: Callable):
        self.req_ids, self.query_start, self.computed, self.prompt_lens = req_ids, query_start, computed, prompt_lens
        self.generators, self.device = generators, device
        self._states, self._info, self.masked_attention = states, info, masked_attention

    def fed(self, row: int) -> tuple[int, int]:
        """The row's fed tokens in the flat batch: [start, end)."""
        return int(self.query_start[row]), int(self.query_start[row + 1])

    def in_prompt(self, row: int) -> bool:
        """The row's forward feeds (the end of) its prompt: it samples the image's first token."""
        return bool(self.computed[row] < self.prompt_lens[row])

    def state(self, row: int):
        """vLLM's request state: prompt_token_ids, output_token_ids, sampling_params."""
        return self._states[self.req_ids[row]]

    def info(self, row: int):
        """The row's `ImageRequestInfo` (None for a request that is not an image request)."""
        return self._info(self.req_ids[row])

    def generator(self, row: int) -> torch.Generator | None:
        return self.generators.get(row)


class StrategyRunner:
    """Runner half of a strategy: one per model runner; explicit state between forwards."""

    owns_batch: ClassVar[bool] = False  # a family's own order: answers for whole batches

    def __init__(self, config, model, model_dir: str, device):
        self.config, self.model, self.model_dir, self.device = config, model, model_dir, device

    @cached_property
    def layout(self) -> ImageLayout:
        """The image's tokens at the model's default size (asked only when an image request needs it:
        a runner half also exists on models that serve plain requests)."""
        return image_layout(self.config)

    @cached_property
    def _layouts(self) -> dict:
        return {}

    def layout_of(self, info) -> ImageLayout:
        """The layout of a request's image (its size's); asked per row per step, so kept here (the
        family's own cache sits behind a transformers config's slow attribute lookups)."""
        if (layout := self._layouts.get(info.size)) is None:
            layout = self._layouts[info.size] = image_layout(self.config, info.size)
        return layout

    # -- token by token: the rows of this strategy's requests in a mixed batch --------------------
    def takes(self, info) -> bool:
        """Whether a request (its `ImageRequestInfo`, None for a plain one) needs this half at all;
        asked once per request, when the runner first sees it. One that does not takes vLLM's own
        path in every step, and its rows are never offered to `prepare`."""
        return True

    def takes_single(self, info) -> bool:
        """Whether it plans a row of a request it takes that feeds a single token (the end of its
        prompt, or one token past it); where not, such rows take vLLM's own path without being
        offered to `prepare` (asked once per request, as `takes`)."""
        return True

    def prepare(self, step: Step, rows: list[int]) -> dict[int, RowPlan]:
        """Before the forward (vLLM has laid out the batch): a plan per row it rewrites; rows it
        leaves out take vLLM's own path (one token, the last one's logits, vLLM's sample). `rows`
        includes forwards that end a prompt (`step.in_prompt`), which sample the first token."""
        return {}

    def emit(self, step: Step, rows: list[int], logits: torch.Tensor, at: list[slice]) -> dict[int, list[int]]:
        """The tokens each planned row appends. `rows`: the rows that sample (a guided pair's uncond
        stream gets its cond stream's tokens); `logits[at[row]]`: its plan's logits rows, guidance
        mixed, image codes only."""
        raise NotImplementedError

    # -- a family's own order: every request of the model, whole batches -----------------------
    def prepare_batch(self, step: Step) -> tuple[np.ndarray, int]:
        """-> (flat token indices whose logits are needed, most logits rows of one request)."""
        raise NotImplementedError

    def sample_batch(self, step: Step, logits: torch.Tensor) -> torch.Tensor:
        """Unmixed logits of the prepared rows -> token ids [rows, width] (int32, padding -1)."""
        raise NotImplementedError

    def report(self, step: Step, row: int):
        """After `emit`: what the scheduler half must learn of the tokens the row appended, beyond the
        tokens themselves (picklable; it reaches `Strategy.runner_report`), or None."""
        return None

    def forget(self, req_id: str, info) -> None:
        """A request has finished: drop what was kept for it."""


class Strategy:
    """Scheduler half of a decoding strategy, and its request format (class methods)."""

    fields: ClassVar[tuple[str, ...]] = ()  # the `Decoding` fields it reads; others must be unset
    order: ClassVar[str | None] = None      # the config.decoding it runs under (None: token by token)
    runner: ClassVar[type[StrategyRunner] | None] = None  # its runner half; None: vLLM's own path
    uses_spec_slots: ClassVar[bool] = False  # asks vLLM for speculative-token slots (then no other speculative method)
    entry_phase: ClassVar[Hashable] = None   # the phase of a request's first forward

    # -- the request format (no engine) ---------------------------------------------------------
    @classmethod
    def checked(cls, decoding) -> dict:
        """The decoding's fields validated (ValueError naming the field) and defaulted."""
        return {}

    @classmethod
    def fitted(cls, decoding, config, size=None):
        """The decoding with its sizes cut to what an image of `config` at `size` can use."""
        return decoding

    @classmethod
    def budget_decodings(cls, config) -> list:
        """Decodings whose widest steps bound those of every request a model of `config` can get
        under this strategy's order (the engine's token budget is sized from them)."""
        from vllm_visual_ar.requests import Decoding

        return [Decoding()]

    @classmethod
    def problem(cls, config, decoding) -> str | None:
        """Why a model of `config` cannot decode this way, or None."""
        if getattr(config, "decoding", None) != cls.order:
            return f"strategy {decoding.strategy!r} does not apply to this model"
        return None

    @classmethod
    def draft_stats(cls, decoding, image_tokens: int, done: int, committed: int,
                    width: int | None = None) -> tuple[int, int]:
        """(drafts verified, drafts accepted) by a forward that committed `committed` tokens to an
        image that had `done` (the frontend's per-image statistics); `width`: the window the forward
        ran at (`step_width`), when the strategy reports it, else the request's own."""
        return 0, 0

    # -- one request in vLLM's scheduler ------------------------------------------------------------
    def __init__(self, config, decoding, size=None):
        self.config, self.decoding, self.size = config, decoding, size

    @cached_property
    def layout(self) -> ImageLayout:
        """The request's image (`size`: a text-to-image request's); asked only of image requests."""
        return image_layout(self.config, self.size)

    def start(self, request) -> str | None:
        """Why this request cannot run this way, or None (then it is tracked until it ends)."""
        return None

    def footprint(self, output_tokens: int) -> Footprint:
        """One stream of an image that asks for `output_tokens` tokens."""
        return Footprint(output_tokens, 1, 0)

    def width_choice(self, request):
        """For a strategy that can run a step narrower than its window (SJD): what the scheduler's
        load-aware policy needs (`load.WidthChoice`), or None to run as requested. Asked of one
        stream of a guided pair: both get its width."""
        return None

    def window_options(self, request):
        """For a load-aware strategy whose schedule is fixed for the whole image (ZipAR's rows): the
        windows it may run at (`load.WindowOption`, the plainest first, its own last), asked when the
        image is admitted (the scheduler then restarts it with the chosen one); None: as requested."""
        return None

    def before_step(self, request, width: int | None = None) -> None:
        """Before a step that runs the request: its speculative-token slots, or a rewind. `width`:
        the tokens per forward the load-aware policy chose (only for requests with a `width_choice`).
        A choice that held every image at width 1 stands for a few steps of the same batch
        (`load.WidthPolicy.holds`), and a request it held is not prepared again in those steps: its
        preparation at width 1 must stand for each of them (vLLM clears speculative slots after the
        step that scheduled them), and whatever it counts per forward counts them when next asked."""

    def runs_rows(self, request) -> bool:
        """Whether the request's forwards, when they feed several tokens, run rows out of raster order
        (the masked path: ZipAR's rows); else they run vLLM's causal path (SJD's drafts). The step
        cost model for whole-image windows tells the two apart (`load.RowCost`)."""
        return False

    def row_start(self, request):
        """For a strategy whose rows start at the scheduler's word (load-aware ZipAR rows), asked
        after `before_step`: what starting another row in this step adds and gives (`load.RowStart`),
        or None where none can start."""
        return None

    def start_row(self, request) -> None:
        """Start the row `row_start` offered, in this step."""
        raise NotImplementedError

    def runner_report(self, request, report) -> None:
        """What the runner half reported of the step that just ran (`StrategyRunner.report`), before
        vLLM appends its tokens to the request."""

    def settings_problem(self, info) -> str | None:
        """Why the request's own settings (its `ImageRequestInfo`) do not fit this strategy, or None:
        here, its per-scale settings, when it has any."""
        return self.scale_sampling_problem(dict(info.scale_sampling)) if info.scale_sampling else None

    def scale_sampling_problem(self, scale_sampling: dict) -> str | None:
        """Why the request's per-scale settings ({name: values}) do not fit, or None."""
        from vllm_visual_ar.requests import per_scale_problem

        return per_scale_problem(scale_sampling, None)

    def phase(self, request) -> Hashable:
        """Which model runs the request's next forward (a step runs one phase)."""
        return None

    def step_width(self, request) -> int | None:
        """The width (tokens per stream) of the step that just ran, for a strategy with a window
        (SJD: the frontends read it from the step's output to count drafts and show the window
        used), else None."""
        return None

    def image_window(self, request) -> int | None:
        """The window the whole image runs at, when the scheduler chose it at admission (ZipAR's
        load-aware window: the frontends' metrics), else None."""
        return None

    def step_drafts(self, request) -> tuple[int, int] | None:
        """(drafts verified, drafts accepted) by the step that just ran, when only the scheduler half
        can tell (from the runner's report); the frontends then count these instead of `draft_stats`."""
        return None

    def frontend_tokens(self, request, new_token_ids: list[int]) -> list[int]:
        """What the frontend is shown of the tokens a step appended to the request."""
        return new_token_ids

    @property
    def rewrites_output(self) -> bool:
        """Whether `frontend_tokens` may show other tokens than vLLM appended (else it is not asked)."""
        return type(self).frontend_tokens is not Strategy.frontend_tokens


def whole_image_problem(layout, request, strategy: str) -> str | None:
    """Strategies that reorder or verify tokens decode whole images and return no logprobs."""
    tokens = layout.num_tokens
    if request.max_tokens != tokens:
        return f"strategy {strategy!r} generates whole images: max_tokens must be {tokens}"
    if request.sampling_params.logprobs is not None:
        return f"strategy {strategy!r} does not return logprobs"
    return None
