"""ZipAR's row-parallel ("wavefront") schedule as plain logic: which tokens each forward feeds and
which raster positions it samples. No model, no engine; the vLLM runner and scheduler read it.

ZipAR (arXiv 2412.04062), as in the authors' LlamaGen code (`LlamaGen-ZipAR/autoregressive/models/
generate_zipar.py::decode_n_tokens_zipar` and `gpt.py::Transformer` row bookkeeping):
- row 0 is decoded in raster order; row 1 starts once row 0 is complete;
- row r+1 (r >= 1) starts once row r has `window` tokens; from then on every active row advances
  one token per forward;
- the first token of a new row r+1 is predicted at the raster slot of (r, W-1), its raster
  predecessor, which does not exist yet: a *stand-in* is fed there, a copy of the most recent
  token of row r-1 (normally (r-1, W-1), the token above the slot);
- when row r's true last token (r, W-1) arrives it is fed too, for its key/value only.

A window >= the grid width is plain raster order. The number of forwards (prefill included) is
W*H for raster and 2W + (H-2)*w otherwise (`forward_passes`).

The engine sees a ZipAR image as one token sequence: the tokens each forward emits (its samples,
in row order, then a stand-in if the next forward starts a row) are appended and all fed by the
next forward, so one forward of a request carries one query per active row plus at most one
stand-in and one finished row's last token. `ZipARSchedule.sequence` lists that sequence; entry i
sits at KV slot `prompt_len + i`.

The strategy (`ZipAR`, `ZipARRunner`, after the schedule) is what vLLM's scheduler and the plugin's
runner ask of it:
- scheduler: a request appends every entry of the sequence, stand-ins included (vLLM counts them as
  output tokens, so KV slots, blocks and frees stay vLLM's), and its widest forward is reserved at
  admission (a partial forward would break the schedule); the frontend is shown image tokens only,
  released in raster order as the raster prefix grows (at least one per forward, since the top
  unfinished row advances every forward);
- runner: each fed token sits at its raster position (2D RoPE row and column), logits are read at
  every token that predicts one, a query sees exactly the cached tokens whose raster index is <= its
  own and no stand-in but itself (`model_executors/masked_attention.py`), and a forward appends one
  sample per predicting token (per-request temperature, top-k, top-p and seed; one batched draw),
  then the stand-in when the next forward starts a row.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property, lru_cache

import numpy as np

from vllm_visual_ar.families import image_layout
from vllm_visual_ar.samplers.coupling import check_flag
from vllm_visual_ar.samplers.sampling import sample_planned
from vllm_visual_ar.samplers.strategy import Footprint, RowPlan, Strategy, StrategyRunner, whole_image_problem


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (ZipAR: a row starts once the row above has "
                         f"`window` tokens; >= the grid width is raster order), got {window!r}")
    return window


def forward_passes(height: int, width: int, window: int, row_end: bool = False) -> int:
    """Forwards per image, prefill included: the closed form of `ZipARSchedule`. With end-of-line
    tokens (`row_end`) a window >= width + 1 is raster order, which vLLM runs token by token (a
    forward per token, the placed ones included)."""
    stride = width + row_end
    w = min(check_window(window), stride)
    if row_end:
        if w == stride:
            return height * stride + 1  # raster: one forward per token, the image end placed by the last
        return width + (height - 1) * (w - 1) + (w == 2 and height > 1)  # see zipar_schedule on window 2
    if w == width or height == 1:
        return height * width
    return 2 * width + (height - 2) * w


@dataclass(frozen=True)
class Entry:
    """One token of the engine-side sequence. `raster` is its index in the image's tokens (raster
    order, end-of-line and image-end tokens counted: the slot it is fed at); a stand-in (copy_of set)
    is fed at the slot of the row end it stands in for; a placed entry (an end of line, an image end)
    is the token the layout forces there."""
    raster: int
    copy_of: int | None = None  # stand-in: raster index of the token it copies
    predicts: int | None = None  # raster index sampled from this token's logits; None = key/value only
    placed: bool = False

    @property
    def stand_in(self) -> bool:
        return self.copy_of is not None


@dataclass(frozen=True)
class ZipARSchedule:
    height: int
    width: int
    window: int
    sequence: tuple[Entry, ...]          # every token the engine appends, in order
    step_starts: tuple[int, ...]         # sequence index of the first entry each forward *emits*
    row_end: bool = False                # rows end with an end-of-line token (the image's slots: width + 1 per row)
    image_end: int = 0                   # image-end tokens after the last row

    @property
    def stride(self) -> int:
        return self.width + self.row_end

    @property
    def raster(self) -> bool:
        """Plain raster order (vLLM's own path runs it)."""
        return self.window == self.stride

    @property
    def num_slots(self) -> int:
        return self.height * self.stride + self.image_end

    @property
    def num_forwards(self) -> int:
        return len(self.step_starts)

    @property
    def num_stand_ins(self) -> int:
        return sum(e.stand_in for e in self.sequence)

    def emitted(self, step: int) -> range:
        """Sequence indices forward `step` appends (its samples, then maybe a stand-in)."""
        end = self.step_starts[step + 1] if step + 1 < self.num_forwards else len(self.sequence)
        return range(self.step_starts[step], end)

    def fed(self, step: int) -> range:
        """Sequence indices forward `step` feeds (step 0 feeds the prompt: empty range)."""
        return self.emitted(step - 1) if step > 0 else range(0)

    @cached_property
    def max_fed_per_forward(self) -> int:
        return max(len(self.fed(t)) for t in range(self.num_forwards))

    @cached_property
    def step_of_first_fed(self) -> dict[int, int]:
        """sequence index of a forward's first fed token -> that forward (for the runner)."""
        return {self.step_starts[t - 1]: t for t in range(1, self.num_forwards)}

    @cached_property
    def raster_order(self) -> list[int]:
        """For each raster index (slot), its sequence index (stand-ins are not in the image)."""
        order = [-1] * self.num_slots
        for i, e in enumerate(self.sequence):
            if not e.stand_in:
                order[e.raster] = i
        return order


@lru_cache(maxsize=64)
def zipar_schedule(height: int, width: int, window: int, row_end: bool = False, image_end: int = 0) -> ZipARSchedule:
    """The schedule of one image. `row_end`: every row is followed by an end-of-line token, placed
    (never sampled) as ZipAR's Lumina-mGPT code does (`Lumina-mGPT-ZipAR/.../modeling_chameleon.py::
    ChameleonForConditionalGeneration._sample`): its window counts a row's leading token (the image
    header for row 0, the row above's end of line otherwise), so row r+1 starts once row r has
    `window - 1` codes, at every row, row 1 included; row r's end of line is placed then, at its own
    slot, which is the raster predecessor of (r+1, 0): it predicts that token, so no stand-in is
    needed. `image_end` tokens follow the last row's end of line, placed with the last code. The
    prompt's forward places nothing (vLLM samples one token there), so at window 2 row 1 starts a
    forward later than in the authors' loop, which places row 0's end of line with its first code."""
    stride = width + row_end
    w = min(check_window(window), stride)
    if row_end and w < 2:
        raise ValueError("window must be >= 2 on a model whose rows end with an end-of-line token (the "
                         "window counts the row's leading token, as ZipAR's Lumina-mGPT code does)")
    count = [0] * height  # codes sampled so far, per row
    closed = [False] * height  # row_end: the row's end of line is placed
    sequence: list[Entry] = []
    step_starts: list[int] = []

    def sample(row: int) -> int:
        raster = row * stride + count[row]
        count[row] += 1
        return raster

    def placements() -> list[Entry]:
        """Tokens placed after a forward's samples: ends of line that start the next row (row_end),
        and after the last code the last row's end of line and the image end."""
        placed = []
        for r in range(height - 1 if row_end else 0):
            if not closed[r] and count[r] >= min(w - 1, width):
                closed[r] = True
                placed.append(Entry(r * stride + width, placed=True))
        if count[height - 1] == width and not closed[height - 1]:
            closed[height - 1] = True
            last = [height * stride - 1] if row_end else []
            placed += [Entry(s, placed=True) for s in last + list(range(height * stride, height * stride + image_end))]
        return placed

    # Forward 0 (the prompt, vLLM's own sampling) samples (0, 0) and places nothing: at window 2 row
    # 0's end of line comes after forward 1, one forward later than the authors' loop places it.
    emitted = [Entry(sample(0))]
    while True:
        step_starts.append(len(sequence))
        if closed[height - 1]:
            sequence += emitted  # the last tokens are never fed
            break
        # Feed what the previous forward emitted; record what each fed token predicts.
        fed, emitted = emitted, []
        for e in fed:
            row, col = divmod(e.raster, stride)
            if e.stand_in or (e.placed and row_end):
                target = row + 1  # a stand-in or an end of line predicts the next row's first code
            elif col < width - 1:
                target = row
            elif not row_end and row + 1 < height and count[row + 1] == 0:
                target = row + 1  # raster hand-over: the row end predicts the next row's first token
            else:
                target = None  # a finished row's last token: key/value only
            predicts = sample(target) if target is not None else None
            sequence.append(Entry(e.raster, e.copy_of, predicts, e.placed))
            if predicts is not None:
                emitted.append(Entry(predicts))
        emitted += placements()
        # No end-of-line tokens: the bottom row reached the window, so the next forward starts the
        # row below via a stand-in.
        bottom = max(r for r in range(height) if count[r] > 0)
        if (not row_end and w < width and 1 <= bottom < height - 1 and count[bottom] == w
                and count[bottom + 1] == 0):
            above = bottom - 1
            emitted.append(Entry(bottom * width + width - 1, copy_of=above * width + count[above] - 1))
    return ZipARSchedule(height, width, w, tuple(sequence), tuple(step_starts), row_end, image_end)


def layout_schedule(layout, window: int) -> ZipARSchedule:
    """The schedule of an image of this `ImageLayout`."""
    return zipar_schedule(layout.rows, layout.cols, window, layout.row_end is not None, len(layout.image_end))


class RasterRelease:
    """The frontend's view of a request that appends its codes out of raster order: codes are released
    as the raster prefix grows, stand-ins never. `raster_of[i]`: the slot of appended token i (-1: a
    stand-in); the list may grow as the request runs."""

    def __init__(self, raster_of: list[int]):
        self.raster_of = raster_of
        self._codes: dict[int, int] = {}  # raster index -> token, not yet released
        self._seen = 0      # output tokens looked at
        self._released = 0  # raster prefix already shown

    def new_codes(self, outputs) -> list[int]:
        for i in range(self._seen, len(outputs)):
            if self.raster_of[i] >= 0:
                self._codes[self.raster_of[i]] = outputs[i]
        self._seen = len(outputs)
        out = []
        while self._released in self._codes:
            out.append(self._codes.pop(self._released))
            self._released += 1
        return out


# -- the strategy: what vLLM's scheduler and the plugin's runner ask of ZipAR ----------------------------
# Keyed by the schedule's sizes, not the schedule: hashing a schedule hashes its whole sequence.
ScheduleKey = tuple  # (height, width, window, row_end, image_end): zipar_schedule's arguments


@lru_cache(maxsize=64)
def visibility(key: ScheduleKey, prefix: int) -> np.ndarray:
    """[S, S] bool over a request's sequence positions (prompt first): position s sees position j
    iff j's raster index <= s's and j is not a stand-in other than s itself. The prompt counts as
    raster -1: seen by all. A forward's mask is a slice of it."""
    schedule = zipar_schedule(*key)
    raster = np.array([-1] * prefix + [e.raster for e in schedule.sequence])
    stand_in = np.array([False] * prefix + [e.stand_in for e in schedule.sequence])
    seen = (raster[None, :] <= raster[:, None]) & ~stand_in[None, :]
    np.fill_diagonal(seen, True)
    return seen


@lru_cache(maxsize=4096)
def forward_plan(key: ScheduleKey, step: int, prefix: int) -> tuple[tuple, tuple]:
    """Forward `step` of a request: (offsets of the fed tokens that predict something, each fed
    token's position: the prompt length plus its raster index)."""
    schedule = zipar_schedule(*key)
    fed = schedule.fed(step)
    entries = schedule.sequence[fed.start:fed.stop]
    return (tuple(j for j, e in enumerate(entries) if e.predicts is not None),
            tuple(prefix + e.raster for e in entries))


def schedule_key(layout, window: int) -> ScheduleKey:
    return (layout.rows, layout.cols, window, layout.row_end is not None, len(layout.image_end))


class ZipARRunner(StrategyRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self._forwards: dict[int, tuple[ZipARSchedule, int, object]] = {}  # this forward's rows -> (schedule, step, layout)

    def takes(self, info):
        """A window of the row's full width is raster order exactly: vLLM's own path."""
        return not zipar_schedule(*schedule_key(self.layout_of(info), info.decoding.window)).raster

    def prepare(self, step, rows):
        plans, self._forwards = {}, {}
        for row in rows:
            if step.in_prompt(row):  # the prompt's forward samples (0, 0): vLLM's own
                continue
            info = step.info(row)
            layout = self.layout_of(info)
            key = schedule_key(layout, info.decoding.window)
            schedule = zipar_schedule(*key)
            start, end = step.fed(row)
            prefix = int(step.prompt_lens[row])
            t = schedule.step_of_first_fed.get(int(step.computed[row]) - prefix)
            if t is None or len(schedule.fed(t)) != end - start:
                raise RuntimeError(f"ZipAR request {step.req_ids[row]}: scheduled {end - start} tokens at KV "
                                   f"length {step.computed[row]}, which is no forward of its schedule")
            predicting, positions = forward_plan(key, t, prefix)
            seen = visibility(key, prefix)
            plans[row] = RowPlan(predicting, positions, lambda q, kv, seen=seen: seen[q][:, kv])
            self._forwards[row] = (schedule, t, layout)
        return plans

    def emit(self, step, rows, logits, at):
        """A code per predicting token, in order, then the tokens the schedule places (ends of line,
        the image end) or the stand-in that starts a row next forward (a copy of an earlier token:
        from the history, or from this forward's samples)."""
        codes = sample_planned(step, rows, logits, at)
        out = {}
        for row in rows:
            schedule, t, layout = self._forwards[row]
            offset = layout.image_token_ids.start
            mine = [offset + c for c in codes[row]]
            n = len(mine)
            emitted = schedule.emitted(t)
            for i in emitted[n:]:
                e = schedule.sequence[i]
                if e.placed:
                    mine.append(layout.forced(e.raster))
                else:  # a stand-in
                    where = schedule.raster_order[e.copy_of]
                    history = step.state(row).output_token_ids
                    mine.append(history[where] if where < len(history) else mine[where - emitted.start])
            out[row] = mine
        return out


class ZipAR(Strategy):
    fields = ("window", "load_aware")
    runner = ZipARRunner

    @classmethod
    def checked(cls, decoding):
        return {"window": check_window(decoding.window), "load_aware": check_flag(decoding.load_aware, "load_aware")}

    @classmethod
    def fitted(cls, decoding, config, size=None):
        layout = image_layout(config, size)
        return replace(decoding, window=min(decoding.window, layout.row_stride))

    @classmethod
    def problem(cls, config, decoding):
        if problem := super().problem(config, decoding):
            return problem
        if image_layout(config).row_end is not None and decoding.window < 2:
            return ("window must be >= 2 on this model: its rows end with an end-of-line token, and the "
                    "window counts that leading token, as ZipAR's Lumina-mGPT code does")
        return None

    @cached_property
    def schedule(self) -> ZipARSchedule:
        return zipar_schedule(*schedule_key(self.layout, self.decoding.window))

    def start(self, request):
        if problem := whole_image_problem(self.layout, request, self.decoding.strategy):
            return problem
        self._release = RasterRelease([-1 if e.stand_in else e.raster for e in self.schedule.sequence])
        return None

    def footprint(self, output_tokens):
        if self.schedule.raster:
            return Footprint(output_tokens, 1, 0)
        return Footprint(len(self.schedule.sequence), self.schedule.max_fed_per_forward, 0)

    def window_options(self, request):
        """A load-aware image's schedule is fixed once it starts, so its window is chosen when it is
        admitted: raster order, then windows halving down to its own (`load.RowCost.choose`)."""
        from vllm_visual_ar.samplers.load import WindowOption

        if not self.decoding.load_aware or request.num_computed_tokens or request.num_output_tokens:
            return None
        stride, windows = self.layout.row_stride, [self.decoding.window]
        while windows[-1] * 2 < stride:
            windows.append(windows[-1] * 2)
        options = []
        for window in [stride] + windows[::-1]:
            schedule = zipar_schedule(*schedule_key(self.layout, window))
            forwards = schedule.num_forwards
            options.append(WindowOption(window, self.layout.num_tokens / forwards,
                                        len(schedule.sequence) / forwards - 1, not schedule.raster,
                                        request.num_prompt_tokens + len(schedule.sequence) / 2))
        return options if len(options) > 1 else None

    def image_window(self, request):
        """A load-aware image's window (the one chosen at admission), for the frontends' metrics."""
        return self.decoding.window if self.decoding.load_aware else None

    def runs_rows(self, request):
        return not self.schedule.raster

    @property
    def rewrites_output(self) -> bool:
        return not self.schedule.raster  # raster order (a load-aware image's restart) appends the image as it is

    def frontend_tokens(self, request, new_token_ids):
        """Stand-ins dropped, image tokens released in raster order as the raster prefix grows."""
        if self.schedule.raster:
            return new_token_ids
        return self._release.new_codes(request.output_token_ids)
