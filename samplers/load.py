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

Choice (`choose_widths`): each image i with window ceiling L_i, acceptance estimate alpha_i and s_i
streams commits c_i(w) = (1 - alpha_i^w) / (1 - alpha_i) tokens per forward at width w (the expected
accepted length of w - 1 drafts accepted one after another with probability alpha_i, plus the token
every forward commits). The step's throughput is (sum of c_i(w_i) + the other requests' tokens) /
t(the step); each image picks the width that maximises it given the others' (two rounds of best
responses, vectorised). An image that has run at width 1 for a while is given width 2 now and then,
so that its acceptance estimate keeps being measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class WidthChoice:
    """What the policy needs of one image whose forward width can be chosen."""
    ceiling: int      # the request's own window (the widest step it reserved)
    alpha: float      # estimated probability that a draft is accepted
    streams: int = 1  # guidance streams that feed the same tokens (the scheduler fills it in)
    minimum: int = 1  # 2 when the strategy needs an observation (no drafts verified lately)


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


def expected_tokens(alpha: float, width: np.ndarray) -> np.ndarray:
    """Tokens a forward of `width` commits when each draft is accepted with probability alpha."""
    if alpha >= 1.0:
        return width.astype(float)
    return (1.0 - alpha ** width) / (1.0 - alpha)


def choose_widths(choices: list[WidthChoice], other_tokens: int, other_commits: float,
                  cost: tuple[float, float, float, float]) -> list[int]:
    """Each image's width for this step (1: a plain forward, no drafts). other_tokens: tokens fed
    this step by requests whose width is fixed; other_commits: the tokens they commit. Every image
    answers the step the others make (all at width 1 first, then at the first answers): two
    vectorised best-response rounds."""
    a, b, d, c_wide = cost
    ceiling = np.array([c.ceiling for c in choices])
    minimum = np.array([c.minimum for c in choices])
    streams = np.array([c.streams for c in choices], dtype=float)
    alpha = np.clip(np.array([c.alpha for c in choices]), 0.0, 0.999)
    options = np.arange(1, ceiling.max() + 1)[None, :]
    gain = (1.0 - alpha[:, None] ** options) / (1.0 - alpha[:, None])  # [images, widths]
    allowed = (options <= ceiling[:, None]) & (options >= minimum[:, None])
    # a width's extra time for an image: its tokens, its drafts, its per-stream verification
    extra = streams[:, None] * ((b + d) * (options - 1) + c_wide * (options > 1))
    widths = np.maximum(minimum, 1)
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
