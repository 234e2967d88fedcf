"""Load-aware windows: before each step the scheduler sizes the window of every request whose
strategy can choose how many tokens a forward verifies (SJD), from a cost model of the step's time
against what it runs, so that acceleration never costs throughput under load. A strategy whose
schedule is fixed for the whole image (ZipAR's rows) has its window chosen once, when the image is
admitted, against the load it meets then (`WindowOption`, `RowCost`); where that choice keeps ZipAR's
rows, each row then starts only in a step that gains from it (`RowStart`, `RowCost.starts`): ZipAR's
window is a ceiling, as SJD's is.

Cost model (`StepCost`): a step that runs s sequences, k drafts, m streams that feed more than one
token past their prompt (drafts or ZipAR rows: masked attention, verification or rows to plan), and
r other extra tokens (the rest of a prompt, ZipAR's rows) takes
t = fixed + e s + g k + c m + p r. The marginal costs (e, g, c, p) are what the choice needs; they
are fitted by least squares on the *differences* between consecutive steps, so whatever else the
step costs (vLLM's own work, the attention over a context that grows) cancels as long as it moves
slowly, and the load a cost was seen at does not leak into another load's estimate. Steps that
differ in nothing teach nothing and are skipped, so the estimates keep what the last informative
steps said (a policy that holds every image at width 1 under load does not forget what a draft
costs). The time of the next step at width 1 is the recent steps' mean time moved by the marginal
costs to the next step's sequences, drafts and extra tokens. Until it has seen drafts vary, the
widths cycle through the windows, 1 and a quarter of the windows (`exploring_widths`); while it holds
every image at width 1 it probes wider now and then (`WidthPolicy`). It is learned on the running device (a
step's time from the start of its `schedule` to the start of the next: the forward and the work
around it, which a decoding with fewer steps also saves), so the same code chooses long windows
where extra tokens are nearly free (a GPU, a large model) and short ones where each costs (a small
model on CPU under load).

Choice (`choose_widths`): each image i with window ceiling L_i and s_i streams is expected to
commit c_i(w) = 1 + k_i ln w tokens per forward at width w. SJD's yield grows like the log of its
window, not like independent draft acceptances would make it (measured on the embedded model:
1.8, 2.3, 2.8, 3.1 tokens per forward at 4, 8, 16, 32): its Jacobi carry makes wide windows accept
in bursts. k_i is estimated from the image's own recent forwards (accepted drafts over the sum of
ln w, the evidence fading per forward: `sjd.SJD._observe`). The step's throughput is (sum of
c_i(w_i) + the other requests' tokens) / t(the step); each image picks the width that maximises it
given the others' (up to two rounds of best responses, vectorised). Under load (more images than a
probe widens) the draft and stream costs are taken at their upper bounds, two standard errors above
the estimates (`StepCost.marginal`): evidence there is a few probes in noisy steps, and a choice
that widens every image on a cost fitted too low loses a whole wave. An image held at width 1 sees
its estimate drift back to the prior, so a low one is measured again. A choice that holds every
image at width 1 stands for the next few steps of the same batch (`WidthPolicy.holds`): under load
making it every step cost more than the slow drift it would follow.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


class WidthChoice(NamedTuple):
    """What the policy needs of one image whose forward width can be chosen (a named tuple: one is
    made per image and step)."""
    ceiling: int      # the request's own window (the widest step it reserved)
    slope: float      # k: expected tokens per forward at width w are 1 + k ln w
    streams: int = 1  # guidance streams that feed the same tokens (the scheduler fills it in)


@dataclass(frozen=True)
class RowStart:
    """What starting another row of a paced image (load-aware ZipAR rows) weighs in a step."""
    commits: float    # image codes it commits per forward now (its active rows)
    gain: float       # codes per forward the start adds, once it runs
    tokens: float     # tokens per stream the start adds to each forward (a row's code and drafts)
    wide: bool        # its streams already take the masked path (rows out of raster order, or several fed)
    context: int      # tokens each of its streams attends to
    streams: int = 1  # guidance streams (the scheduler fills it in)


@dataclass(frozen=True)
class StepShape:
    """What a step runs, as the cost model sees it."""
    sequences: int
    drafts: int = 0        # speculative tokens fed
    wide_streams: int = 0  # streams that feed more than one token past their prompt (drafts, ZipAR rows)
    extra: int = 0         # other tokens beyond one per sequence (prompts, ZipAR's rows)
    wide_context: int = 0  # tokens the row streams attend to, summed (`RowCost`)
    # Of the above, what streams other than rows feed (`RowCost`: a row stream is a wide stream of an
    # image whose window is fixed for the whole image, ZipAR's, on the masked path): wide streams
    # (SJD's, verifying drafts on vLLM's causal path), and tokens beyond one per sequence (their
    # drafts, prompts).
    other_wide: int = 0
    other_tokens: int = 0

    def vector(self) -> np.ndarray:
        return np.array([self.sequences, self.drafts, self.wide_streams, self.extra], dtype=float)


@dataclass(frozen=True)
class Marginal:
    """Seconds a step costs per sequence, per draft, per wide stream (drafts or rows), per extra token."""
    sequence: float
    draft: float
    wide_stream: float
    extra: float


class StepCost:
    """The step-time model of the module doc: marginal costs by least squares with forgetting on the
    differences of consecutive steps, and the recent steps' mean time and shape (`follow`: the weight
    of the newest step)."""

    def __init__(self, forget: float = 0.98, follow: float = 0.2, prior_weight: float = 2.0, confidence: float = 2.0):
        self.forget, self.follow, self.prior_weight, self.confidence = forget, follow, prior_weight, confidence
        self._xx = np.zeros((4, 4))
        self._xy = np.zeros(4)
        self._yy = 0.0  # forgetting-weighted sum of the squared time differences (the fit's residual)
        self._weight = 0.0  # forgetting-weighted count of the differences seen
        self._fitted: tuple[Marginal, Marginal] | None = None  # the last fit and its upper bounds
        self._draft_diffs = 0  # differences in which drafts or wide streams moved
        self.steps = 0  # steps observed
        self._last: tuple[np.ndarray, float] | None = None
        self._mean: tuple[np.ndarray, float] | None = None  # recent shape and time

    def observe(self, shape: StepShape, seconds: float) -> None:
        if not seconds > 0 or shape.sequences <= 0:
            return
        x = shape.vector()
        if self._last is not None and (dx := x - self._last[0]).any():
            self._xx = self.forget * self._xx + np.outer(dx, dx)
            self._xy = self.forget * self._xy + (seconds - self._last[1]) * dx
            self._yy = self.forget * self._yy + (seconds - self._last[1]) ** 2
            self._weight = self.forget * self._weight + 1.0
            self._fitted = None
            self._draft_diffs += bool(dx[1] != 0 or dx[2] != 0)
        self.steps += 1
        self._last = (x, seconds)
        f = self.follow
        self._mean = (x, seconds) if self._mean is None else (
            (1 - f) * self._mean[0] + f * x, (1 - f) * self._mean[1] + f * seconds)

    def marginal(self, upper: bool = False) -> Marginal | None:
        """The marginal costs, once drafts have varied between consecutive steps 8 times, else None.
        The estimates are pulled towards 0 by a prior worth `prior_weight` differences: while the
        evidence is thin (a few noisy steps) it errs towards drafts being cheap, which the wider
        steps it leads to then correct; an error the other way would hold every image at width 1,
        where nothing more is learnt of drafts. `upper`: each cost `confidence` standard errors
        above its estimate (the fit's residual spread through the evidence it has): what widening
        is weighed at (`WidthPolicy.widths`), so that a few noisy steps cannot make drafts look free
        where they are not (one fast probe step under load had a verifying stream's cost fitted at
        0 and 16 images widened to 2-4 for a whole wave: 0.77x raster)."""
        if self._draft_diffs < 8:
            return None
        if self._fitted is None:
            typical = np.diag(self._xx) / self._weight  # a difference's mean square, per cost
            ridge = np.diag(self.prior_weight * typical) + 1e-9 * (typical.sum() + 1e-12) * np.eye(4)
            inverse = np.linalg.inv(self._xx + ridge)
            beta = inverse @ self._xy
            residual = max(self._yy - 2 * beta @ self._xy + beta @ self._xx @ beta, 0.0)
            variance = residual / max(self._weight - 4, 1.0)  # of one difference's time
            error = np.sqrt(np.maximum(np.diag(inverse), 0.0) * variance)
            self._fitted = (Marginal(*(float(max(v, 0.0)) for v in beta)),
                            Marginal(*(float(max(v, 0.0)) for v in beta + self.confidence * error)))
        return self._fitted[upper]

    def predict(self, shape: StepShape, marginal: Marginal) -> float:
        """Seconds of a step of this shape: the recent mean moved by the marginal costs."""
        x, t = self._mean
        beta = np.array([marginal.sequence, marginal.draft, marginal.wide_stream, marginal.extra])
        return max(t + float(beta @ (shape.vector() - x)), 1e-9)


class WidthPolicy:
    """The scheduler's side of load-aware widths: the cost model, the choice, and probes. While the
    model knows nothing of drafts the widths explore (`exploring_widths`); when it holds every image
    at width 1, wider steps are tried by its first `probe_images` images, so that an estimate made
    from a few noisy steps, or on a machine that has since changed, is checked against this one. The
    first probe comes `probe_every` steps after the last choice that widened; under load (more images
    than probe), each probe after which the choice still holds every image at width 1 doubles the
    wait, up to `probe_every_most`. The probes were most of what load-aware SJD still cost over
    raster under load (side run, SJD L=64 at 16 in flight, six rounds: 0.93-0.96x raster with a
    probe every 64 steps, 1.00x without probes); a few images alone, which gain most from a wider
    step, keep probing every `probe_every` steps."""

    probe_every = 64
    probe_every_most = 512
    probe_images = 4  # images a probe widens: enough drafts to show their cost, a fraction of a loaded step's
    probe_width = 16  # the widest a probe goes: a draft's cost is linear enough to extrapolate from there
    hold_steps = 8
    hold_steps_most = 64

    def __init__(self):
        self.cost = StepCost()
        self.rows = RowCost()
        self._since_rows = self._since_plain = 0  # steps since the last with / without wide streams
        # (step, batch, steps it stands) of the last choice that held every image at width 1
        self._held: tuple[int, object, int] | None = None
        self._probe_wait = self.probe_every
        self._next_probe = self.probe_every  # the step of the next probe, should every image stay at width 1
        self._probes = 0

    def observe(self, shape: StepShape, seconds: float) -> None:
        self.cost.observe(shape, seconds)
        self.rows.observe(shape, seconds)
        rows = shape.wide_streams > shape.other_wide
        self._since_rows = 0 if rows else self._since_rows + 1
        self._since_plain = self._since_plain + 1 if rows else 0

    def widths(self, choices: list[WidthChoice], narrow: StepShape, other_commits: float,
               batch: object = None) -> list[int]:
        """Each image's width this step; `narrow`: the step with every one of them at width 1;
        `batch`: what identifies the requests in the step (`holds`)."""
        ceilings = [c.ceiling for c in choices]
        marginal = self.cost.marginal()
        last, self._held = self._held, None
        if marginal is None:
            return exploring_widths(ceilings, self.cost.steps)
        # under load, widening is weighed at the costs' upper bounds: there a wrong choice widens
        # every image for a wave, and evidence comes only from probes; a few images alone weigh it
        # at the estimates, which each of their steps keeps testing
        chosen = choose_widths(choices, self.cost.predict(narrow, marginal), other_commits,
                               self.cost.marginal(upper=len(choices) > self.probe_images))
        steps = self.cost.steps
        if max(chosen) > 1:
            self._probe_wait, self._next_probe = self.probe_every, steps + self.probe_every
        elif steps < self._next_probe:
            if batch is not None:  # a choice that holds again in the same batch stands twice as long
                again = last is not None and last[1] == batch
                self._held = (steps, batch, min(2 * last[2], self.hold_steps_most) if again else self.hold_steps)
        else:
            # a quarter of the windows and the whole windows (up to `probe_width`) in turn: drafts
            # per stream vary, so what a draft costs and what a verifying stream costs stay apart;
            # only the first few images probe (all 64 of a loaded step at width 16 cost that step
            # several times over)
            probe = exploring_widths([min(c, self.probe_width) for c in ceilings[:self.probe_images]],
                                     2 * self._probes)
            self._probes += 1
            self._next_probe = steps + self._probe_wait
            if len(choices) > self.probe_images:  # under load; a few images gain most from a wider step
                self._probe_wait = min(2 * self._probe_wait, self.probe_every_most)
            return probe + chosen[len(probe):]
        return chosen

    def holds(self, batch: object) -> bool:
        """Whether the last choice, which held every image at width 1, stands for this step too
        (its images then run at width 1 without being asked): in the same `batch` (no request
        admitted or gone since), unless a probe is due, for `hold_steps` steps after it, and twice as
        many each time the choice made at the end of a hold holds again in the same batch (up to
        `hold_steps_most`). Under load that choice moves slowly (an image's estimate drifts back to
        the prior over tens of forwards, the cost model over hundreds of steps), and making it was the
        dearest part of the scheduler's step (measured here: 0.5 ms of a 13 ms step with 64 images;
        every 8 steps it still cost about 1% of a 16-image wave)."""
        steps = self.cost.steps
        held = self._held
        return held is not None and held[1] == batch and steps - held[0] < held[2] and steps < self._next_probe

    def row_starts(self, starts: list[RowStart], step: StepShape, other_commits: float) -> list[bool]:
        """Which paced images start a row this step (`RowCost.starts`); `step`: the step as it stands.
        Until the model has seen 8 steps every row starts (ZipAR's own rule): those steps are its
        evidence."""
        chosen = self.rows.starts(starts, step, other_commits)
        return [True] * len(starts) if chosen is None else chosen

    stale_after = 2048

    def options(self, options: list[WindowOption], streams: int, count: int, sequences: int, images: int,
                queued: tuple[int, int] = (0, 0), others_wide: bool = True) -> list[int]:
        """The option (index) each of `count` images admitted together with these options runs with
        (`RowCost.choose`): `sequences` and `images` in the step they join, themselves included;
        `queued`: the (sequences, images) waiting for room behind them; `others_wide`: whether
        anything else in it may feed several tokens. Where
        the model would keep rows out and no step has had any for `stale_after` steps, one of them
        gets its own window anyway; where it would give rows to images joining others and no step has
        been without them as long, one of them gets raster order: steps with and without rows, at
        the load of the moment, are what tell their costs apart, and the machine may have changed
        since the model's evidence of one side was taken. One image probes, not the group: the group's
        probe costs what its option costs at that load (64 images given ZipAR w=8's rows ran a wave
        at 0.61x raster), one image's about the masked path's set-up for the step (0.87x at 16 in
        flight with ZipAR w=4), and a probe is due where the model has long found rows not to pay.
        Alone, each ZipAR image's first row is such a step, so a single image is never made to probe."""
        index = self.rows.choose(options, streams, count, sequences, images, queued, others_wide)
        chosen = [index] * count
        if index == 0 and self._since_rows >= self.stale_after:
            self._since_rows, chosen[0] = 0, len(options) - 1
        elif index > 0 and images > 1 and self._since_plain >= self.stale_after:
            self._since_plain, chosen[0] = 0, 0
        return chosen


@dataclass(frozen=True)
class WindowOption:
    """One way to decode a whole image whose schedule is fixed at admission (ZipAR: a window), as
    averages over its forwards."""
    window: int
    commits: float  # image tokens per forward
    extra: float    # tokens fed per forward beyond one, per stream
    wide: bool      # its forwards feed more than one token (masked attention, rows to plan)
    context: float  # mean tokens each of its forwards attends to (the masked path reads them all)
    # The decoding the image restarts with when this option is chosen (another strategy: ZipAR x SJD
    # falling back to ZipAR's rows or raster order); None: its own, at `window`.
    decoding: object = None


class RowCost:
    """The cost model for choices that hold for a whole image (ZipAR's window at admission). What
    such an image adds to a step grows with its context: the masked attention of each of its rows
    reads every token before it, so its forwards cost several times more at the end of the image
    than at the start (measured here: 10.8 ms at the start of a 16-image ZipAR w=4 batch, 19.3 ms at
    its end, 5.8 ms raster). That drift is what `StepCost`'s differences cancel, so this model fits
    absolute step times instead: t = a + b s + c m + p r + q C + f [m > 0] + c' m' + p' r', with m
    the row streams (`Strategy.runs_rows`), r the tokens beyond one they feed (drafts included), C
    their summed context, f what the first row stream costs the whole step (the masked attention's
    set-up), and m', r' the other wide streams and the other tokens beyond one per sequence, by
    least squares over the last `keep` steps with row streams and the last `keep` without. The
    other streams get their own terms: SJD's drafts run vLLM's causal path at a fraction of a
    masked row token's cost, and counted as rows (or, as before, left out while their streams
    counted) they made a lone ZipAR x SJD image's own setting look two to five times dearer than it
    ran, so it took raster order or ZipAR's rows alone (144-256 forwards against 58-91). Kept
    apart, neither kind pushes the other out: under load, where every image runs in raster order,
    what rows cost is still known (forgetting by time would have pulled it to zero and handed rows
    to the next images, whose set-up alone costs a raster step). Coefficients with no evidence at
    all are pulled to 0 by a small prior, so the first images get their own window and their steps
    teach the model."""

    def __init__(self, keep: int = 256, prior_weight: float = 2.0):
        self.prior_weight = prior_weight
        self._steps = (deque(maxlen=keep), deque(maxlen=keep))  # (features, seconds): without, with row streams
        self._fitted: np.ndarray | None = None
        self._last: np.ndarray | None = None  # the last step's features

    @staticmethod
    def features(shape: StepShape) -> np.ndarray:
        rows = shape.wide_streams - shape.other_wide
        return np.array([1.0, shape.sequences, rows, shape.extra + shape.drafts - shape.other_tokens,
                         shape.wide_context / 1000, float(rows > 0), shape.other_wide, shape.other_tokens])

    def observe(self, shape: StepShape, seconds: float) -> None:
        if not seconds > 0 or shape.sequences <= 0:
            return
        x = self.features(shape)
        self._steps[bool(x[2] > 0)].append((x, seconds))
        self._fitted, self._last = None, x

    def coefficients(self) -> np.ndarray | None:
        steps = [*self._steps[0], *self._steps[1]]
        if len(steps) < 8:
            return None
        if self._fitted is None:
            x = np.array([f for f, _ in steps])
            xx, xy = x.T @ x, x.T @ np.array([t for _, t in steps])
            typical = np.diag(xx) / len(steps)
            ridge = np.diag(np.r_[0.0, self.prior_weight * typical[1:]]) + 1e-9 * np.eye(len(typical))
            self._fitted = np.maximum(np.linalg.solve(xx + ridge, xy), 0.0)
        return self._fitted

    def starts(self, starts: list[RowStart], step: StepShape, other_commits: float) -> list[bool] | None:
        """Which images start a row in this step (None before 8 steps): where the step's codes per
        second, counted as from the next forward on (the row then adds its codes to every forward,
        and its tokens to each), do not drop. With C the step's codes per forward and T its time, a
        row that adds g codes and dt seconds starts iff (C + g) / (T + dt) >= C / T, i.e. g T >= C dt.
        dt = streams x (p per token it adds, and for an image still in raster order what a wide
        stream costs: c + q x its context), and f for the step's first wide stream. An image's first
        early row is the costly one: it takes the masked path for good, so it is weighed as the whole
        of the image's own setting against raster order (`RowStart.gain`, `tokens`); the rows after
        it add their own codes and tokens. Images decide in turn, each against the step the earlier
        ones made."""
        beta = self.coefficients()
        if beta is None:
            return None
        now = self.features(step)
        seconds = max(float(beta @ now), 1e-6)
        commits = other_commits + sum(s.commits for s in starts)
        wide_step = now[2] > 0
        out = []
        for s in starts:
            dt = s.streams * (beta[3] * s.tokens + (not s.wide) * (beta[2] + beta[4] * s.context / 1000))
            dt += (not s.wide and not wide_step) * beta[5]
            go = s.gain * seconds >= commits * dt
            if go:
                commits, seconds, wide_step = commits + s.gain, seconds + dt, wide_step or not s.wide
            out.append(bool(go))
        return out

    def choose(self, options: list[WindowOption], streams: int, count: int, sequences: int, images: int,
               queued: tuple[int, int] = (0, 0), others_wide: bool = True, tolerance: float = 0.05) -> int:
        """The option for `count` images starting together (`streams` each) that gives the step the
        most image tokens per second (the step as it was last, with `sequences` and `images`, these
        included). They choose as one: what the first wide stream costs the step is paid once, and
        a lone image would refuse it where a group gains. `queued`: the (sequences, images) waiting
        behind them for room in the step budget. They join the step if these images run in raster
        order, whose reservation is the narrowest, and stay out behind the reservation of any wider
        option. `others_wide`: whether the step may hold other wide streams, as the last one did;
        False where nothing else runs (the last step then is another workload's). `options` run from the plainest (raster) to the most parallel; of those within
        `tolerance` of the best gain over the first, the most parallel is taken (an image best in
        raster order stays there). Before 8 steps: the last."""
        beta = self.coefficients()
        if beta is None:
            return len(options) - 1
        now = self._last.copy()
        now[1] = sequences
        if not others_wide:  # the step they join has no wide streams but theirs
            now[2:] = 0.0
        base = max(float(beta @ now) - count * streams * beta[1], 1e-6)  # the step without these images
        rate = np.array([(images - count + count * o.commits + (not o.wide) * queued[1]) / (
            base + count * streams * (beta[1] + o.wide * (beta[2] + beta[3] * o.extra + beta[4] * o.context / 1000))
            + beta[5] * o.wide * (now[5] == 0) + (not o.wide) * queued[0] * beta[1]) for o in options])
        near = rate - rate[0] >= (rate.max() - rate[0]) * (1 - tolerance)
        return int(len(options) - 1 - near[::-1].argmax())


def exploring_widths(ceilings: list[int], step: int) -> list[int]:
    """Widths while the cost model knows nothing of drafts: the windows, width 1, a quarter of the
    windows, width 1, in turn, so that consecutive steps differ in drafts and in streams that verify
    them (their costs can then be told apart) and the first steps keep most of the windows' gain."""
    phase = step % 4
    return [c if phase == 0 else max(2, c // 4) if phase == 2 else 1 for c in ceilings]


def expected_tokens(slope, width: np.ndarray) -> np.ndarray:
    """Tokens a forward of `width` commits: 1 + k ln w (k per image: [images, 1] against [1, widths])."""
    return 1.0 + slope * np.log(width)


def choose_widths(choices: list[WidthChoice], base_seconds: float, other_commits: float,
                  marginal: Marginal, tolerance: float = 0.05) -> list[int]:
    """Each image's width for this step (1: a plain forward, no drafts). base_seconds: the step's
    time with every image here at width 1; other_commits: the tokens the other requests commit.
    Every image answers the step the others make (all at width 1 first, then at the first answers):
    two vectorised best-response rounds. Of the widths that bring the step at least 1 - `tolerance`
    of what the best width brings over width 1, it takes the widest (an image best at width 1 stays
    there). Alone, the rate is nearly flat around its best, so noise in the estimates would move the
    width from step to step, and a step narrower than the last drops the Jacobi drafts carried past
    it (`sjd.fill_drafts`)."""
    ceiling = np.array([c.ceiling for c in choices])
    streams = np.array([c.streams for c in choices], dtype=float)
    slope = np.array([max(c.slope, 0.0) for c in choices])
    options = np.arange(1, ceiling.max() + 1)[None, :]
    gain = expected_tokens(slope[:, None], options)  # [images, widths]
    allowed = options <= ceiling[:, None]
    # a width's extra time for an image: its drafts (their forward and verification), its streams' own work
    extra = streams[:, None] * (marginal.draft * (options - 1) + marginal.wide_stream * (options > 1))
    widths = np.ones(len(choices), dtype=int)
    for _ in range(2):
        rows = np.arange(len(choices))
        extra_now = extra[rows, widths - 1]
        total_time = base_seconds + extra_now.sum()
        total_commits = other_commits + gain[rows, widths - 1].sum()
        rate = (total_commits - gain[rows, widths - 1][:, None] + gain) / (total_time - extra_now[:, None] + extra)
        rate = np.where(allowed, rate, -np.inf)
        narrow = rate[:, :1]  # the rate with the image at width 1
        near = rate - narrow >= (rate.max(1, keepdims=True) - narrow) * (1 - tolerance)
        answers = options.shape[1] - near[:, ::-1].argmax(1)  # the widest of the near-best widths
        if (answers == widths).all():  # the next round would answer the same step the same way
            break
        widths = answers
    return widths.tolist()


def cap_to_budget(widths: list[int], streams: list[int], spare: int) -> list[int]:
    """Cut the widest images to a common level, the highest whose extra tokens (streams x (width -
    1)) fit in `spare` tokens of the step's budget, then give what is left to the first ones cut; the
    scheduler reserves only width 2 per load-aware stream up front."""
    spare = max(spare, 0)

    def extra(level):
        return sum(s * (min(w, level) - 1) for w, s in zip(widths, streams))

    if extra(max(widths, default=1)) <= spare:
        return list(widths)
    low, high = 1, max(widths)  # extra(low) fits, extra(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if extra(mid) <= spare else (low, mid)
    out = [min(w, low) for w in widths]
    left = spare - extra(low)
    for i, (w, s) in enumerate(zip(widths, streams)):
        if w > low and s <= left:
            out[i] += 1
            left -= s
    return out
