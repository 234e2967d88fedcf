"""ZipAR x SJD: ZipAR's row wavefront (`zipar.py`) where every active row carries its own Jacobi
window, verified by SJD's rule (`sjd.py::verify`), so a row advances by 1 to `sjd_window` tokens
per forward instead of exactly one. No paper or code combines the two (`../shared/reference/
anchors-2026.md`); the rules below are this project's, chosen so that `sjd_window` = 1 is ZipAR
token for token.

Rows (H rows of W codes). How a row starts is ZipAR's (`zipar.py::zipar_schedule`), per layout:
- no end-of-line tokens (LlamaGen): row 0 is decoded alone; row 1 starts once row 0 is complete, its
  first token predicted by row 0's last one (raster hand-over); row r+1 (r >= 1) starts once row r
  has `window` codes, by a stand-in fed at the slot of (r, W-1), a copy of row r-1's latest code. A
  window >= W starts every row by hand-over. The lag is `window` codes;
- an end of line after each row (Lumina-mGPT, Emu3: ZipAR's Lumina-mGPT rule, the window counts the
  row's leading token): row r+1 starts once row r has `window - 1` codes, every row, row 1 included,
  by placing row r's end of line at its own slot, which predicts (r+1, 0); no stand-ins. The last
  row's end of line and the image-end tokens are placed with its last code. As in ZipAR, the
  prompt's forward places nothing. The lag is `window - 1` codes; a window of the row's width + 1
  is raster order;
- ZipAR samples (r+1, c) when row r has c + lag codes; here row r+1 may commit column c only if
  row r had at least c + lag codes (or was complete) when its target was computed, so every
  committed token saw at least what ZipAR would show it. A row whose predecessor commits at least
  one token per forward therefore never stalls, which SJD guarantees;
- each forward, a row's chain is its head (the token whose logits predict its next column: its
  latest code, the stand-in, or the row above's last code at a hand-over) and up to
  `sjd_window - 1` drafts for its next columns, within the row. The whole chain is verified as one
  SJD window and at most the codes up to the column the row above allows are committed
  (`sjd.held_back`): 1 to `sjd_window` per row. What the test settled past that column (accepted
  drafts, the draw at a rejection) leads the next drafts, then the forward's samples past a
  rejection (a Jacobi step), so a row that waits on the row above keeps what it verified and
  refines its next codes: a row's window is not cut to its room under the row above, where SJD's
  yield (which grows with the window) would be lost.

Attention: the tokens a forward commits are fed by the next forward (their keys/values are computed
then, seeing every committed token whose raster index is <= theirs, as in ZipAR); drafts are queries
only. A query sees the committed tokens whose raster index is <= its own and no stand-in but itself
(ZipAR's rule); a draft also sees the earlier drafts of its own row's chain, never another row's
(unverified) drafts. Positions are raster positions (2D RoPE).

Drafts: the Jacobi tail carried from the row's last verification (SJD), then "horizontal" (the code
to the left; at column 0, the code above: never random, so greedy decoding is deterministic) or
"random" (uniform over the codes). `group_acceptance` tests each row's drafts with GSD's grouped
rule instead of SJD's (`sjd.py::group_ratio`; not exact, nor is ZipAR).

In vLLM: the forward feeds the tokens the previous one committed (and the stand-in), then the drafts
in speculative-token slots. The runner half verifies and appends every committed token; the
scheduler half rewinds vLLM's computed count to before them (vLLM's accounting would keep drafts'
keys/values as if they were the committed tokens) and sets the next forward's slots. Both halves
run the same row bookkeeping (`Wavefront`): the runner half reports each forward's per-row commits
(`StrategyRunner.report`), which the scheduler half needs for the slot count, the stand-ins and
the frontend's raster-order release. A forward whose fed tokens and drafts are in raster order (no
row started early, drafts of one row) takes vLLM's positions and causal attention; one without
drafts (sjd_window 1) draws its rows' codes in one batch, as ZipAR does.

Paced rows (load-aware, `Wavefront.paced`): a row does not start as soon as ZipAR's rule allows.
Before each step the scheduler half offers the start (`ZipARSJD.row_start`), the scheduler weighs
it against the step it is building (`load.RowCost.starts`) and, if it starts, the row's stand-in or
the end of line above rides in the forward's first speculative slot; the runner half, on every
rank, sees one more fed token than its pending tokens and drafts and starts the same row. A row not
started early starts when the row above completes (raster hand-over, or that row's end of line at
its own place). Once the last code is in, the request ends with the tokens it appended (a row
handed over uses no stand-in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
import torch

from vllm_visual_ar.families import image_layout
from vllm_visual_ar.samplers.coupling import check_flag
from vllm_visual_ar.samplers.sampling import sample_planned
from vllm_visual_ar.samplers.sjd import (Drafts, GroupTables, check_init, given_ratio, held_back, targets_of,
                                         verify_batch)
from vllm_visual_ar.samplers.strategy import Footprint, RowPlan, Strategy, StrategyRunner, whole_image_problem
from vllm_visual_ar.samplers.zipar import RasterRelease, check_window

DEFAULT_SJD_WINDOW = 8


def check_row_window(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"sjd_window must be an integer >= 1 (ZipAR x SJD: tokens each active row verifies "
                         f"per forward; 1 = ZipAR), got {value!r}")
    return value


@dataclass(frozen=True)
class Entry:
    """A committed token, a stand-in or a placed token (an end of line, an image end), as appended to
    the request (the next forward feeds it)."""
    raster: int                  # its slot: index in the image's tokens, raster order (ends of line counted)
    copy_of: int | None = None   # a stand-in: raster index of the code it copies
    heads: int | None = None     # the row whose next code its logits predict; None: key/value only
    placed: bool = False         # the token the layout forces at its slot

    @property
    def stand_in(self) -> bool:
        return self.copy_of is not None


@dataclass(frozen=True)
class Chain:
    """One row's part of a forward: its head (index among the fed entries) and drafts."""
    row: int
    head: int          # index of the head in `Wavefront.pending`
    first: int         # the column the head predicts
    drafts: int        # drafts fed, for columns first .. first + drafts - 1
    most: int          # the most codes it may commit: columns first .. up to the row above's limit


@dataclass
class Wavefront:
    """One image's rows under ZipAR x SJD: codes committed per row, and the entries the next forward
    feeds. Pure bookkeeping, run alike by the runner half and the scheduler half."""
    height: int
    width: int
    window: int
    jacobi: int
    row_end: bool = False  # an end-of-line token after each row (its slot: the row's last)
    image_end: int = 0     # tokens placed after the last row's end of line
    # Rows start at the scheduler's word (`open`), one forward at a time, instead of as soon as the
    # row above allows; a row nobody opened starts when the row above completes (raster hand-over).
    paced: bool = False
    count: list[int] = field(default_factory=list)  # codes committed per row
    pending: list[Entry] = field(default_factory=list)  # appended by the last forward, fed by the next
    started: list[bool] = field(default_factory=list)
    opened: Entry | None = None  # paced: the row start the next forward feeds, in its first speculative slot
    forwards: int = 0            # commits so far (the prompt's included)
    _chains: list | None = field(default=None, repr=False)

    def __post_init__(self):
        self.stride = self.width + self.row_end
        self.window = min(self.window, self.stride)
        # Row r+1 predicts column c once row r has c + lag codes (module doc).
        self.lag = self.window - 1 if self.row_end else self.window
        self.count = [0] * self.height
        self.started = [True] + [False] * (self.height - 1)

    @property
    def done(self) -> bool:
        return self.count[-1] == self.width

    @property
    def stand_ins(self) -> int:
        """Stand-ins an image appends: one per row from row 2 on, when rows overlap."""
        return max(0, self.height - 2) if not self.row_end and self.window < self.width else 0

    def limit(self, row: int) -> int:
        """The last column `row` may predict now: the row above's codes less the lag."""
        if row == 0 or self.count[row - 1] == self.width:
            return self.width - 1
        return self.count[row - 1] - self.lag

    @property
    def fed(self) -> list[Entry]:
        """What the next forward feeds before its drafts: the pending entries, then the opened row start."""
        return self.pending + [self.opened] if self.opened is not None else self.pending

    def opening(self) -> Entry | None:
        """Paced: the entry that would start the next row if the next forward fed it (the bottom row's
        end of line, placed early, or a stand-in), where ZipAR's rule allows it now; else None. Never
        after the prompt's forward alone, which places nothing (as unpaced)."""
        if not self.paced or self.opened is not None or self.forwards < 2:
            return None
        bottom = max(r for r in range(self.height) if self.started[r])
        if bottom == self.height - 1 or self.count[bottom] == self.width:
            return None
        if self.row_end:
            if self.count[bottom] >= self.lag:
                return Entry(bottom * self.stride + self.width, heads=bottom + 1, placed=True)
        elif self.window < self.width and bottom >= 1 and self.count[bottom] >= self.window:
            above = bottom - 1
            return Entry(bottom * self.width + self.width - 1, copy_of=above * self.width + self.count[above] - 1,
                         heads=bottom + 1)
        return None

    def open(self) -> Entry:
        """Paced: start the row `opening` names in the next forward."""
        entry = self.opening()
        if entry is None:
            raise RuntimeError("ZipAR x SJD: no row can start now")
        self.opened, self._chains = entry, None
        self.started[entry.heads] = True
        return entry

    def chains(self) -> list[Chain]:
        """The chains of the next forward, top row first (kept until a commit or an opening)."""
        if self._chains is None:
            self._chains = self._chains_now()
        return self._chains

    def _chains_now(self) -> list[Chain]:
        out = []
        for i, e in enumerate(self.fed):
            if e.heads is None:
                continue
            first = self.count[e.heads]
            limit = self.limit(e.heads)
            if first > limit:  # cannot happen: each row commits >= 1 code per forward (module doc)
                raise RuntimeError(f"ZipAR x SJD: row {e.heads} stalled at column {first} (limit {limit})")
            drafts = min(self.jacobi - 1, self.width - 1 - first)
            out.append(Chain(e.heads, i, first, drafts, min(drafts + 1, limit - first + 1)))
        return sorted(out, key=lambda c: c.row)

    def draft_count(self) -> int:
        return sum(c.drafts for c in self.chains())

    def drafts_of(self, committed: dict[int, int]) -> tuple[int, int]:
        """(drafts verified, drafts accepted) by the forward that committed `committed` (before
        `commit`): each row verified the drafts it could commit, and all it committed but the last
        code (a fresh sample) were accepted drafts."""
        chains = self.chains()
        return sum(c.most - 1 for c in chains), sum(committed.get(c.row, 1) - 1 for c in chains)

    def commit(self, committed: dict[int, int], place: bool = True) -> list[Entry]:
        """Codes committed per row this forward -> the entries appended: the row start it fed in a
        speculative slot (paced), each row's codes, top row first, then the end of line or stand-in
        that starts a row, and after the last code the tokens placed after it. All but the row start
        are pending: the next forward feeds them. `place` False: the prompt's forward, which places
        nothing."""
        self.forwards += 1
        self._chains = None
        entries = []
        for row in sorted(committed):
            n = committed[row]
            start = self.count[row]
            if n < 1 or start + n > self.width or start + n - 1 > self.limit(row):
                raise RuntimeError(f"ZipAR x SJD: {n} codes committed to row {row} at column {start}")
            self.count[row] += n
            for col in range(start, start + n):
                last = col == start + n - 1
                heads = None
                if last and col < self.width - 1:
                    heads = row
                elif last and not self.row_end and row + 1 < self.height and not self.started[row + 1] and (
                        row == 0 or self.window >= self.width or self.paced):
                    heads = row + 1  # raster hand-over
                    self.started[row + 1] = True
                entries.append(Entry(row * self.stride + col, heads=heads))
        if self.row_end:
            if place:
                entries += self._placements(self.height - 1 in committed)
        elif self.window < self.width and not self.paced:
            # the bottom started row reached the window: a stand-in starts the next
            bottom = max(r for r in range(self.height) if self.started[r])
            if 1 <= bottom < self.height - 1 and self.count[bottom] >= self.window:
                above = bottom - 1
                self.started[bottom + 1] = True
                entries.append(Entry(bottom * self.width + self.width - 1,
                                     copy_of=above * self.width + self.count[above] - 1, heads=bottom + 1))
        self.pending = entries
        opened, self.opened = self.opened, None
        return [opened] + entries if opened is not None else entries

    def _placements(self, last_row_moved: bool) -> list[Entry]:
        """Rows that end with an end of line: the ends of line that start the next row (a row with
        `lag` codes; paced, a complete row), then, once the last row is complete, its end of line
        and the image end."""
        placed = []
        for r in range(self.height - 1):
            if not self.started[r + 1] and self.count[r] >= (self.width if self.paced else min(self.lag, self.width)):
                self.started[r + 1] = True
                placed.append(Entry(r * self.stride + self.width, heads=r + 1, placed=True))
        if last_row_moved and self.done:
            end = self.height * self.stride
            placed += [Entry(s, placed=True) for s in range(end - 1, end + self.image_end)]
        return placed

    def start(self) -> list[Entry]:
        """The prompt's forward sampled (0, 0)."""
        return self.commit({0: 1}, place=False)

    def widest_step(self) -> int:
        """A bound on the tokens of one forward: committed tokens fed plus drafts. Row r+1 lags row r
        by at least lag - 1 codes, so at most (W - 1) / (lag - 1) + 1 rows are active (all of them
        at lag 1), plus one that just completed, each feeding up to `jacobi` codes and `jacobi` - 1
        drafts, and a stand-in or an end of line."""
        return min(self._rows_at_once() * (2 * self.jacobi - 1) + 1,
                   self.height * self.stride + self.image_end + self.stand_ins)

    def widest_drafts(self) -> int:
        return self._rows_at_once() * (self.jacobi - 1)

    def _rows_at_once(self) -> int:
        return self.height if self.lag <= 1 else min(self.height, (self.width - 1) // (self.lag - 1) + 2)


def wavefront(layout, decoding) -> Wavefront:
    """An image's rows; load-aware images' rows start at the scheduler's word (paced)."""
    return Wavefront(layout.rows, layout.cols, decoding.window, decoding.sjd_window, layout.row_end is not None,
                     len(layout.image_end), bool(decoding.load_aware))


def row_drafts(jacobi: int, cols: int) -> float:
    """The drafts a row feeds per forward, on average over its columns: its window less the head,
    cut at the row's end (measured on the embedded LlamaGen, w=8 x L=16: 16.0 tokens per stream and
    forward, against 15.9 so estimated; the whole window per row, as estimated before, gave 30.6)."""
    return sum(min(jacobi - 1, cols - 1 - c) for c in range(cols)) / cols


def initial_drafts(carried: Drafts, n: int, init: str, codes: int, row: int, first: int, tokens: dict[int, int],
                   stride: int, generator, device) -> Drafts:
    """n drafts for columns first .. of `row`: the carried Jacobi tail, then initialised ("horizontal":
    the code to the left, at column 0 the code above; "random": uniform). `tokens`: raster index
    (rows `stride` apart) -> committed code."""
    kept, q = list(carried.tokens[:n]), carried.q[:n]
    fresh = n - len(kept)
    if fresh <= 0:
        return Drafts(kept, q)
    if init == "random":
        new = torch.randint(codes, (fresh,), generator=generator, device=device).tolist()
    else:
        new = []
        for i in range(fresh):
            col = first + len(kept) + i
            prior = kept + new
            if prior:
                new.append(prior[-1])
            elif col > 0:
                new.append(tokens[row * stride + col - 1])
            else:
                new.append(tokens[(row - 1) * stride])
    one_hot = torch.nn.functional.one_hot(torch.tensor(new, dtype=torch.long, device=device), codes).float()
    return Drafts(kept + new, torch.cat([q.to(one_hot.device), one_hot]))


@dataclass
class _Image:
    """What the runner half keeps of one image between forwards (shared by its guidance streams)."""
    front: Wavefront
    codes: dict[int, int] = field(default_factory=dict)  # raster index -> committed code
    raster: list[int] = field(default_factory=list)      # per appended token: its slot
    carried: dict[int, Drafts] = field(default_factory=dict)  # row -> Jacobi tail
    chains: list[Chain] = field(default_factory=list)    # this forward's
    drafts: dict[int, Drafts] = field(default_factory=dict)  # this forward's, per row
    report: tuple = ()                                    # this forward's commits, (row, codes) pairs

    raster_prefix: bool = True  # every appended token so far sits at its raster slot (raster order)
    # `raster` as an array and, per appended token, whether it is a stand-in: for the masks (grown,
    # not rebuilt every forward)
    raster_np: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    stand_in_np: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))

    def append(self, entries: list[Entry]) -> None:
        start = len(self.raster)
        self.raster += [e.raster for e in entries]
        self.raster_np = np.concatenate((self.raster_np, np.array(self.raster[start:], dtype=np.int64)))
        self.stand_in_np = np.concatenate((self.stand_in_np, np.array([e.stand_in for e in entries], dtype=bool)))
        self.raster_prefix = self.raster_prefix and all(e.raster == start + i for i, e in enumerate(entries))


def _visibility(raster: np.ndarray, stand_in: np.ndarray, draft_row: np.ndarray):
    """The mask rule of the module doc over one stream's sequence (prompt: raster -1)."""
    def visible(q, kv):
        seen = raster[kv][None, :] <= raster[q][:, None]
        seen &= ~stand_in[kv][None, :] | (kv[None, :] == q[:, None])
        dk = draft_row[kv][None, :]
        return seen & ((dk < 0) | (dk == draft_row[q][:, None]))
    return visible


class ZipARSJDRunner(StrategyRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self.images: dict[str, _Image] = {}
        self._leads: dict[int, str] = {}  # this forward's sampling rows -> image id
        self.groups = GroupTables(self.model, self.device)

    def prepare(self, step, rows):
        streams_of: dict[str, list[int]] = {}
        for row in rows:
            if not step.in_prompt(row):  # the prompt's forward samples (0, 0): vLLM's own
                streams_of.setdefault(step.info(row).image_id, []).append(row)
        plans, self._leads = {}, {}
        for image_id, streams in streams_of.items():
            streams.sort(key=lambda r: step.info(r).role == "uncond")
            lead = streams[0]
            info = step.info(lead)
            layout = self.layout_of(info)
            image = self.images.get(image_id)
            if image is None:
                image = self.images[image_id] = _Image(wavefront(layout, info.decoding))
                image.append(image.front.start())
                image.codes[0] = step.state(lead).output_token_ids[0] - layout.image_token_ids.start
            front, stride = image.front, layout.row_stride
            start, end = step.fed(lead)
            if front.opening() is not None and end - start != len(front.pending) + front.draft_count():
                front.open()  # the scheduler started a row: it rides in the first speculative slot
            image.chains = front.chains()
            image.drafts = {}
            opened = [front.opened] if front.opened is not None else []
            draft_raster, draft_rows = [], []
            slot_tokens = [self._token(image, layout, e) for e in opened]
            for chain in image.chains if front.draft_count() else ():  # rows alone: no drafts (emit draws)
                drafts = initial_drafts(image.carried.get(chain.row, Drafts.empty(layout.codebook_size)),
                                        chain.drafts, info.decoding.init, layout.codebook_size, chain.row,
                                        chain.first, image.codes, stride, step.generator(lead), self.device)
                image.drafts[chain.row] = drafts
                draft_raster += [chain.row * stride + chain.first + i for i in range(chain.drafts)]
                draft_rows += [chain.row] * chain.drafts
                slot_tokens += [layout.image_token_ids.start + d for d in drafts.tokens]
            pending = len(front.pending)
            # Logits rows: each chain's head, then its drafts (offsets among the fed tokens).
            logits, at = [], len(front.fed)
            for chain in image.chains:
                logits += [chain.head] + list(range(at, at + chain.drafts))
                at += chain.drafts
            ahead = [e.raster for e in opened] + draft_raster  # the speculative slots' slots
            tail_raster = np.concatenate((image.raster_np, np.array(ahead, dtype=np.int64)))
            tail_stand_in = np.concatenate((image.stand_in_np, np.array([e.stand_in for e in opened], dtype=bool),
                                            np.zeros(len(draft_raster), dtype=bool)))
            outputs = len(image.raster)
            tail_draft_row = np.concatenate((np.full(outputs + len(opened), -1), draft_rows)).astype(np.int64)
            causal = image.raster_prefix and ahead == list(range(outputs, outputs + len(ahead)))
            for row in streams:
                start, end = step.fed(row)
                prefix = int(step.prompt_lens[row])
                if len(step.state(row).output_token_ids) != outputs or int(step.computed[row]) != \
                        prefix + outputs - pending or end - start != pending + len(slot_tokens):
                    raise RuntimeError(f"ZipAR x SJD request {step.req_ids[row]}: scheduled {end - start} tokens "
                                       f"at KV length {step.computed[row]}, which is not its next forward")
                if causal:
                    # Raster order so far (no row started early, drafts of one row): vLLM's own
                    # positions and causal attention are the rule's.
                    plans[row] = RowPlan(logits, None, None, slot_tokens or None)
                    continue
                raster = np.concatenate((np.full(prefix, -1), tail_raster))
                stand_in = np.concatenate((np.zeros(prefix, dtype=bool), tail_stand_in))
                draft_row = np.concatenate((np.full(prefix, -1), tail_draft_row))
                fed = raster[prefix + outputs - pending:prefix + outputs + len(ahead)]
                plans[row] = RowPlan(logits, (fed + prefix).tolist(), _visibility(raster, stand_in, draft_row),
                                     slot_tokens or None)
            self._leads[lead] = image_id
        return plans

    def emit(self, step, rows, logits, at):
        """Verify each row's chain (SJD's rule), append the committed codes, top row first, then the
        stand-in that starts a row. Images whose forward has no drafts (rows alone, sjd_window 1) draw
        one code per row, all batched, as ZipAR does; the chains of all the others are verified
        together (`sjd.verify_batch`)."""
        plain = [r for r in rows if not self.images[self._leads[r]].front.draft_count()]
        drawn = sample_planned(step, plain, logits, at) if plain else {}
        verified = self._verify(step, [r for r in rows if r not in drawn], logits, at)
        out = {}
        for row in rows:
            image = self.images[self._leads[row]]
            layout = self.layout_of(step.info(row))
            if row in drawn:
                committed = {chain.row: 1 for chain in image.chains}
                for chain, code in zip(image.chains, drawn[row]):
                    image.codes[chain.row * layout.row_stride + chain.first] = code
                    image.carried.pop(chain.row, None)
            else:
                committed = verified[row]
            entries = image.front.commit(committed)
            image.append(entries)
            image.report = tuple(committed.items())
            out[row] = [self._token(image, layout, e) for e in entries]
        return out

    def _verify(self, step, rows, logits, at) -> dict[int, dict[int, int]]:
        """Every chain of these rows' images verified by SJD's rule in one batch, each up to the column
        the row above allows (`sjd.held_back`): -> per row, codes committed per image row."""
        if not rows:
            return {}
        chains, ps, drafts, generators, continued, ratios = [], [], [], [], [], []
        for row, p in zip(rows, targets_of(step, rows, logits, at)):
            image = self.images[self._leads[row]]
            info = step.info(row)
            layout = self.layout_of(info)
            group = self.groups(layout, layout.codebook_size) if info.decoding.group_acceptance else None
            first = 0
            for chain in image.chains:
                n = chain.drafts + 1
                chains.append((row, image, layout, chain))
                ps.append(p[first:first + n])
                drafts.append(image.drafts[chain.row])
                generators.append(step.generator(row))
                continued.append(bool(info.decoding.continue_after_reject))
                ratios.append(given_ratio(ps[-1], drafts[-1], group=group))
                first += n
        committed = {row: {} for row in rows}
        for (row, image, layout, chain), p, result in zip(chains, ps, verify_batch(ps, drafts, generators, continued,
                                                                                   ratios)):
            codes, image.carried[chain.row] = held_back(result, p, chain.most)
            committed[row][chain.row] = len(codes)
            for i, code in enumerate(codes):
                image.codes[chain.row * layout.row_stride + chain.first + i] = code
        return committed

    @staticmethod
    def _token(image, layout, entry: Entry) -> int:
        if entry.placed:
            return layout.forced(entry.raster)
        return layout.image_token_ids.start + image.codes[entry.copy_of if entry.stand_in else entry.raster]

    def report(self, step, row):
        return self.images[self._leads[row]].report

    def forget(self, req_id, info):
        if info is not None:
            self.images.pop(info.image_id, None)


class ZipARSJD(Strategy):
    fields = ("window", "sjd_window", "init", "continue_after_reject", "group_acceptance", "load_aware")
    runner = ZipARSJDRunner
    uses_spec_slots = True

    @classmethod
    def checked(cls, decoding):
        return {"window": check_window(decoding.window),
                "sjd_window": check_row_window(DEFAULT_SJD_WINDOW if decoding.sjd_window is None
                                               else decoding.sjd_window),
                "init": check_init("horizontal" if decoding.init is None else decoding.init),
                "continue_after_reject": check_flag(decoding.continue_after_reject, "continue_after_reject"),
                "group_acceptance": check_flag(decoding.group_acceptance, "group_acceptance"),
                "load_aware": check_flag(decoding.load_aware, "load_aware")}

    @classmethod
    def fitted(cls, decoding, config, size=None):
        layout = image_layout(config, size)
        return replace(decoding, window=min(decoding.window, layout.row_stride),
                       sjd_window=min(decoding.sjd_window, layout.cols))

    @classmethod
    def problem(cls, config, decoding):
        if problem := super().problem(config, decoding):
            return problem
        if image_layout(config).row_end is not None and decoding.window < 2:
            return ("window must be >= 2 on this model: its rows end with an end-of-line token, and the "
                    "window counts that leading token, as ZipAR's Lumina-mGPT code does")
        return None

    def window_options(self, request):
        """Load-aware: when the image is admitted, raster order, ZipAR's rows alone (its window) or its
        own rows and SJD windows, whichever the step gains most from (`load.RowCost.choose`); the
        first two restart it as strategy "zipar" (raster order is ZipAR at the row's full width, which
        runs vLLM's own path). With its own, each row then starts only in a step that gains from it
        (`Wavefront.paced`, `row_start`). Its SJD yield is not known before it runs:
        each row is taken to commit 1 + 0.35 ln(sjd_window) codes per forward, half SJD's prior
        (`sjd.SJD.width_choice`), since a row cannot pass the column the row above allows (measured:
        72 forwards at w=8 x L=8 on t2i-mnist against 70 so estimated, 85 at w=8 x L=16 on the
        embedded LlamaGen against 73)."""
        if not self.decoding.load_aware or request.num_computed_tokens or request.num_output_tokens:
            return None
        return self._options(request.num_prompt_tokens)

    def _options(self, prompt_tokens: int) -> list:
        from vllm_visual_ar.requests import Decoding
        from vllm_visual_ar.samplers.load import WindowOption
        from vllm_visual_ar.samplers.zipar import schedule_key, zipar_schedule

        layout, decoding = self.layout, self.decoding
        context = prompt_tokens + layout.num_tokens / 2
        options = []
        for window in (layout.row_stride, decoding.window):
            schedule = zipar_schedule(*schedule_key(layout, window))
            forwards = schedule.num_forwards
            options.append(WindowOption(window, layout.num_tokens / forwards, len(schedule.sequence) / forwards - 1,
                                        not schedule.raster, context, Decoding("zipar", window, load_aware=True)))
        rows = options[-1].extra + 1  # ZipAR's tokens fed per forward: about one per active row
        speed = 1 + 0.35 * math.log(decoding.sjd_window)
        commits = options[-1].commits * speed
        # fed per forward: the codes the last one committed, and each row's drafts
        fed = commits + rows * row_drafts(decoding.sjd_window, layout.cols)
        options.append(WindowOption(decoding.window, commits, fed - 1, True, context))
        return options

    def image_window(self, request):
        """A load-aware image that kept its own setting: its ZipAR window (for the frontends' metrics)."""
        return self.decoding.window if self.decoding.load_aware else None

    def start(self, request):
        if problem := whole_image_problem(self.layout, request, self.decoding.strategy):
            return problem
        self._release = RasterRelease([])  # its list grows with every step's report
        self._drafts: tuple[int, int] | None = None  # (verified, accepted) by the step that just ran
        self._early = False  # a row started before the row above was complete
        return None

    @cached_property
    def front(self) -> Wavefront:
        """The image's rows, kept in step with the runner half's by its reports."""
        return wavefront(self.layout, self.decoding)

    def footprint(self, output_tokens):
        """Paced rows take one more speculative slot: the row start."""
        return Footprint(output_tokens + self.front.stand_ins, self.front.widest_step(),
                         self.front.widest_drafts() + self.front.paced)

    def _append(self, entries: list[Entry]) -> None:
        self._release.raster_of += [-1 if e.stand_in else e.raster for e in entries]

    def _started(self, request) -> None:
        if not self._release.raster_of and request.num_output_tokens > 0:  # the prompt's forward sampled (0, 0)
            self._append(self.front.start())

    def runner_report(self, request, report):
        self._started(request)
        self._drafts = self.front.drafts_of(dict(report))
        self._append(self.front.commit(dict(report)))
        if self.front.done:
            # Paced rows may hand over where a stand-in was reserved: the image ends with what it appended.
            request.max_tokens = len(self._release.raster_of)

    def step_drafts(self, request):
        return self._drafts

    def runs_rows(self, request):
        """Once a row has started before the row above completed, for good (the runner half's
        forwards leave vLLM's causal path then: `ZipARSJDRunner.prepare`); before, its forwards feed
        one row's drafts in raster order."""
        if not self._early:
            front = self.front
            self._early = any(front.started[r] and front.count[r - 1] < front.width for r in range(1, front.height))
        return self._early

    def before_step(self, request, width=None):
        """Past the prompt: vLLM counted the last forward's first drafts as computed keys/values for
        the tokens it appended; rewind to before them (the forward feeds them) and give the drafts
        their slots."""
        self._drafts = None
        if request.num_computed_tokens < request.num_prompt_tokens:
            return
        self._started(request)
        request.num_computed_tokens = request.num_tokens - len(self.front.pending)
        request.spec_token_ids = [0] * self.front.draft_count()

    def row_start(self, request):
        """Paced (load-aware) rows, after `before_step`: what another row would add to this step and
        give the image (`load.RowStart`), where one may start now; else None. An image still in
        raster order that starts a row early takes the masked path for the rest of its life, so that
        start weighs what its own setting gains over raster order on average (`window_options`: its
        codes and tokens per forward); after it, a row adds 1 + 0.35 ln(sjd_window) codes and its
        tokens to each forward."""
        from vllm_visual_ar.samplers.load import RowStart

        front = self.front
        if request.num_computed_tokens < request.num_prompt_tokens or front.opening() is None:
            return None
        speed = 1 + 0.35 * math.log(front.jacobi)
        commits = len(front.chains()) * speed
        if self.runs_rows(request):
            return RowStart(commits, speed, 1 + row_drafts(front.jacobi, front.width), True, request.num_computed_tokens)
        own = self._own_option  # in raster order it commits `commits` per forward, on vLLM's causal path
        return RowStart(commits, own.commits - commits, own.extra, False, request.num_computed_tokens)

    @cached_property
    def _own_option(self):
        """Its own setting's averages per forward (`window_options`' last; the context is not read)."""
        return self._options(0)[-1]

    def start_row(self, request):
        """Start the row `row_start` offered in this step: it rides in the first speculative slot (the
        runner half tells it from the slot count), its drafts after it."""
        self.front.open()
        self._early = True  # out of raster order from now on: the masked path for good
        request.spec_token_ids = [0] * (1 + self.front.draft_count())

    def frontend_tokens(self, request, new_token_ids):
        """Stand-ins dropped, codes released in raster order as the raster prefix grows."""
        self._started(request)
        return self._release.new_codes(request.output_token_ids)
