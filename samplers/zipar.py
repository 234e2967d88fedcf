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
import torch

from vllm_visual_ar.families import image_layout
from vllm_visual_ar.samplers.sampling import sample_rows
from vllm_visual_ar.samplers.strategy import Footprint, RowPlan, Strategy, StrategyRunner, whole_image_problem


def check_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (ZipAR: a row starts once the row above has "
                         f"`window` tokens; >= the grid width is raster order), got {window!r}")
    return window


def forward_passes(height: int, width: int, window: int) -> int:
    """Forwards per image, prefill included: the closed form of `ZipARSchedule`."""
    w = min(check_window(window), width)
    if w == width or height == 1:
        return height * width
    return 2 * width + (height - 2) * w


@dataclass(frozen=True)
class Entry:
    """One token of the engine-side sequence. `raster` is the image position it is fed at; a
    stand-in (copy_of set) is fed at the raster slot of the row end it stands in for."""
    raster: int
    copy_of: int | None = None  # stand-in: raster index of the token it copies
    predicts: int | None = None  # raster index sampled from this token's logits; None = key/value only

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
        """For each raster index, its sequence index (stand-ins are not in the image)."""
        order = [-1] * (self.height * self.width)
        for i, e in enumerate(self.sequence):
            if not e.stand_in:
                order[e.raster] = i
        return order


@lru_cache(maxsize=64)
def zipar_schedule(height: int, width: int, window: int) -> ZipARSchedule:
    w = min(check_window(window), width)
    count = [0] * height  # tokens sampled so far, per row
    sequence: list[Entry] = []
    step_starts: list[int] = []

    def sample(row: int) -> int:
        raster = row * width + count[row]
        count[row] += 1
        return raster

    emitted = [Entry(sample(0))]  # forward 0 (the prompt) samples (0, 0)
    while True:
        step_starts.append(len(sequence))
        if sum(count) == height * width:
            sequence += emitted  # the last token is never fed
            break
        # Feed what the previous forward emitted; record what each fed token predicts.
        fed, emitted = emitted, []
        for e in fed:
            row, col = divmod(e.raster, width)
            if e.stand_in:
                target = row + 1
            elif col < width - 1:
                target = row
            elif row + 1 < height and count[row + 1] == 0:
                target = row + 1  # raster hand-over: the row end predicts the next row's first token
            else:
                target = None  # a finished row's last token: key/value only
            predicts = sample(target) if target is not None else None
            sequence.append(Entry(e.raster, e.copy_of, predicts))
            if predicts is not None:
                emitted.append(Entry(predicts))
        # The bottom row reached the window: the next forward starts the row below via a stand-in.
        bottom = max(r for r in range(height) if count[r] > 0)
        if w < width and 1 <= bottom < height - 1 and count[bottom] == w and count[bottom + 1] == 0:
            above = bottom - 1
            emitted.append(Entry(bottom * width + width - 1, copy_of=above * width + count[above] - 1))
    return ZipARSchedule(height, width, w, tuple(sequence), tuple(step_starts))


# -- the strategy: what vLLM's scheduler and the plugin's runner ask of ZipAR ----------------------------
# Keyed by the schedule's sizes, not the schedule: hashing a schedule hashes its whole sequence.
@lru_cache(maxsize=64)
def visibility(height: int, width: int, window: int, prefix: int) -> np.ndarray:
    """[S, S] bool over a request's sequence positions (prompt first): position s sees position j
    iff j's raster index <= s's and j is not a stand-in other than s itself. The prompt counts as
    raster -1: seen by all. A forward's mask is a slice of it."""
    schedule = zipar_schedule(height, width, window)
    raster = np.array([-1] * prefix + [e.raster for e in schedule.sequence])
    stand_in = np.array([False] * prefix + [e.stand_in for e in schedule.sequence])
    seen = (raster[None, :] <= raster[:, None]) & ~stand_in[None, :]
    np.fill_diagonal(seen, True)
    return seen


@lru_cache(maxsize=4096)
def forward_plan(height: int, width: int, window: int, step: int, prefix: int) -> tuple[tuple, tuple]:
    """Forward `step` of a request: (offsets of the fed tokens that predict something, each fed
    token's position: the prompt length plus its raster index)."""
    schedule = zipar_schedule(height, width, window)
    fed = schedule.fed(step)
    entries = schedule.sequence[fed.start:fed.stop]
    return (tuple(j for j, e in enumerate(entries) if e.predicts is not None),
            tuple(prefix + e.raster for e in entries))


class ZipARRunner(StrategyRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self._forwards: dict[int, tuple[ZipARSchedule, int]] = {}  # this forward's rows -> (schedule, step)

    def prepare(self, step, rows):
        height, width = self.layout.rows, self.layout.cols
        plans, self._forwards = {}, {}
        for row in rows:
            schedule = zipar_schedule(height, width, step.info(row).decoding.window)
            if schedule.window == width:  # raster order exactly: vLLM's own path
                continue
            start, end = step.fed(row)
            prefix = int(step.prompt_lens[row])
            t = schedule.step_of_first_fed.get(int(step.computed[row]) - prefix)
            if t is None or len(schedule.fed(t)) != end - start:
                raise RuntimeError(f"ZipAR request {step.req_ids[row]}: scheduled {end - start} tokens at KV "
                                   f"length {step.computed[row]}, which is no forward of its schedule")
            predicting, positions = forward_plan(height, width, schedule.window, t, prefix)
            seen = visibility(height, width, schedule.window, prefix)
            plans[row] = RowPlan(predicting, positions, lambda q, kv, seen=seen: seen[q][:, kv])
            self._forwards[row] = (schedule, t)
        return plans

    def emit(self, step, rows, logits, at):
        """A sample per predicting token, in order, then the stand-in if the schedule starts a row
        next forward (a copy of an earlier token: from the history, or from this forward's samples)."""
        index = torch.cat([torch.arange(at[r].start, at[r].stop) for r in rows]).to(logits.device)
        settings, generators, first = [], [], 0
        for row in rows:
            params = step.state(row).sampling_params
            n = at[row].stop - at[row].start
            settings += [(params.temperature, max(params.top_k or 0, 0), params.top_p)] * n
            if (g := step.generator(row)) is not None:
                generators.append((slice(first, first + n), g))
            first += n
        temperature, top_k, top_p = (torch.tensor(c, device=logits.device) for c in zip(*settings))
        tokens = sample_rows(logits[index].float(), temperature, top_k, top_p, generators).tolist()
        out, first = {}, 0
        for row in rows:
            n = at[row].stop - at[row].start
            mine, first = tokens[first:first + n], first + n
            schedule, t = self._forwards[row]
            emitted = schedule.emitted(t)
            last = schedule.sequence[emitted.stop - 1]
            if last.stand_in:
                where = schedule.raster_order[last.copy_of]
                history = step.state(row).output_token_ids
                mine.append(history[where] if where < len(history) else mine[where - emitted.start])
            out[row] = mine
        return out


class ZipAR(Strategy):
    fields = ("window",)
    runner = ZipARRunner

    @classmethod
    def checked(cls, decoding):
        return {"window": check_window(decoding.window)}

    @classmethod
    def fitted(cls, decoding, config):
        return replace(decoding, window=min(decoding.window, image_layout(config).cols))

    @cached_property
    def schedule(self) -> ZipARSchedule:
        layout = image_layout(self.config)
        return zipar_schedule(layout.rows, layout.cols, self.decoding.window)

    def start(self, request):
        if problem := whole_image_problem(self.config, request, self.decoding.strategy):
            return problem
        self._raster_of = [-1 if e.stand_in else e.raster for e in self.schedule.sequence]
        self._codes: dict[int, int] = {}  # raster index -> token, not yet released
        self._seen = 0      # output tokens looked at
        self._released = 0  # raster prefix already shown to the frontend
        return None

    def footprint(self, output_tokens):
        if self.schedule.window == self.schedule.width:  # raster order exactly
            return Footprint(output_tokens, 1, 0)
        return Footprint(len(self.schedule.sequence), self.schedule.max_fed_per_forward, 0)

    def frontend_tokens(self, request, new_token_ids):
        """Stand-ins dropped, image tokens released in raster order as the raster prefix grows."""
        if self.schedule.window == self.schedule.width:
            return new_token_ids
        outputs = request.output_token_ids
        for i in range(self._seen, len(outputs)):
            if self._raster_of[i] >= 0:
                self._codes[self._raster_of[i]] = outputs[i]
        self._seen = len(outputs)
        out = []
        while self._released in self._codes:
            out.append(self._codes.pop(self._released))
            self._released += 1
        return out
