"""Load-aware windows: before each step the scheduler sizes the window of every request whose
strategy can choose how many tokens a forward verifies (SJD), from a cost model of the forward's
time against the tokens in the step, so that acceleration never costs throughput under load.

Cost model (`StepCost`): t = a + b n + d k + c m for a step of n tokens, k of them drafts, in m
streams that verify drafts (the strategy's own work per draft and per image), fitted by least squares with
exponential forgetting on the steps the engine actually runs (the time from the end of `schedule` to
`update_from_output`, the forward and the sampling). It is learned on the running device, so the same
code chooses long windows where extra tokens are nearly free (a GPU, a large model) and short ones
where each token costs (a small model on CPU under load). Until it has seen steps of different
sizes it claims nothing, and every request runs its own window.

Choice (`choose_widths`): each image i with window ceiling L_i and s_i streams is expected to
commit c_i(w) = 1 + k_i ln w tokens per forward at width w. SJD's yield grows like the log of its
window, not like independent draft acceptances would make it (measured on the embedded model:
1.8, 2.3, 2.8, 3.1 tokens per forward at 4, 8, 16, 32): its Jacobi carry makes wide windows accept
in bursts. k_i is estimated from the image's own forwards (accepted drafts over the sum of ln w).
The step's throughput is (sum of c_i(w_i) + the other requests' tokens) / t(the step); each image
picks the width that maximises it given the others' (two rounds of best responses, vectorised). An
image held at width 1 keeps its estimate (from its prior and its wider forwards) until the load
lets it widen again.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WidthChoice:
    """What the policy needs of one image whose forward width can be chosen."""
    ceiling: int      # the request's own window (the widest step it reserved)
    slope: float      # k: expected tokens per forward at width w are 1 + k ln w
    streams: int = 1  # guidance streams that feed the same tokens (the scheduler fills it in)


class StepCost:
    """Step time against what the step runs: t = a + b n + d k + c m for n tokens fed, k of them
    drafts, in m streams that verify drafts (a draft costs the strategy's own work besides its share
    of the forward: drafting, verification), least squares with forgetting and a light ridge (a
    term the steps seen cannot tell apart stays ~0)."""

    def __init__(self, forget: float = 0.97):
        self.forget = forget
        self._xx = np.zeros((4, 4))
        self._xy = np.zeros(4)
        self._w = 0.0

    def observe(self, tokens: int, drafts: int, wide_streams: int, seconds: float) -> None:
        if tokens <= 0 or not seconds > 0:
            return
        x = np.array([1.0, float(tokens), float(drafts), float(wide_streams)])
        self._xx = self.forget * self._xx + np.outer(x, x)
        self._xy = self.forget * self._xy + seconds * x
        self._w = self.forget * self._w + 1.0

    def fit(self) -> tuple[float, float, float, float] | None:
        """(a, b, d, c) once the steps seen differ in size (tokens spread at least half their mean),
        else None."""
        if self._w < 4:
            return None
        mean = self._xx[0, 1] / self._w
        var = self._xx[1, 1] / self._w - mean * mean
        if var <= 0 or 2 * np.sqrt(var) < mean * 0.5:
            return None
        ridge = 1e-6 * np.diag([0.0, self._xx[1, 1], self._xx[2, 2] + self._w, self._xx[3, 3] + self._w])
        beta = np.linalg.solve(self._xx + ridge + 1e-12 * np.eye(4), self._xy)
        return tuple(float(max(v, 0.0)) for v in beta)


def expected_tokens(slope, width: np.ndarray) -> np.ndarray:
    """Tokens a forward of `width` commits: 1 + k ln w (k per image: [images, 1] against [1, widths])."""
    return 1.0 + slope * np.log(width)


def choose_widths(choices: list[WidthChoice], other_tokens: int, other_commits: float,
                  cost: tuple[float, float, float, float]) -> list[int]:
    """Each image's width for this step (1: a plain forward, no drafts). other_tokens: tokens fed
    this step by requests whose width is fixed; other_commits: the tokens they commit. Every image
    answers the step the others make (all at width 1 first, then at the first answers): two
    vectorised best-response rounds."""
    a, b, d, c_wide = cost
    ceiling = np.array([c.ceiling for c in choices])
    streams = np.array([c.streams for c in choices], dtype=float)
    slope = np.array([max(c.slope, 0.0) for c in choices])
    options = np.arange(1, ceiling.max() + 1)[None, :]
    gain = expected_tokens(slope[:, None], options)  # [images, widths]
    allowed = options <= ceiling[:, None]
    # a width's extra time for an image: its tokens, its drafts, its per-stream verification
    extra = streams[:, None] * ((b + d) * (options - 1) + c_wide * (options > 1))
    widths = np.ones(len(choices), dtype=int)
    for _ in range(2):
        rows = np.arange(len(choices))
        extra_now = extra[rows, widths - 1]
        total_time = a + b * (other_tokens + streams.sum()) + extra_now.sum()
        total_commits = other_commits + gain[rows, widths - 1].sum()
        rate = (total_commits - gain[rows, widths - 1][:, None] + gain) / (total_time - extra_now[:, None] + extra)
        widths = np.where(allowed, rate, -np.inf).argmax(1) + 1
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
