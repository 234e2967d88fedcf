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
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache


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
