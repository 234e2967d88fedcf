"""Speculative Jacobi Decoding (SJD, arXiv 2410.01699) as plain logic: draft initialisation, the
probabilistic acceptance rule and the Jacobi update. No model, no engine; the vLLM runner calls it.

One iteration (the authors' `scheduler/jacobi_iteration_lumina_mgpt.py::SpeculativeSampler`) feeds
[x0 = the last committed token, d_1 .. d_{K-1} drafts] in one forward. The logits at input k give the
target distribution p_k of position k+1 (guided, filtered, tempered: exactly what raster decoding
would sample from). Then, for j = 1 .. K-1: accept d_j with probability min(1, p_{j-1}(d_j) / q_j(d_j)),
where q_j is the distribution d_j was drawn from. At the first rejection, draw the token from
norm(max(0, p_{j-1} - q_j)) and stop; if every draft is accepted, draw a bonus token from p_{K-1}.
1 to K tokens are committed per forward. This is speculative sampling, so the committed tokens are
distributed exactly as raster sampling's.

Jacobi update: the drafts after the first rejection are not committed, but the forward already gave
the distributions of their positions (conditioned on the rejected prefix); samples from them, with
those distributions as their q, become the next window's first drafts. The rest of the window is
filled by the initialisation: "random" (uniform over the image codes) or "horizontal" (repeat the
token to the left; the paper's neighbour initialisation, random at column 0). An initialised draft
is chosen without looking at the model, so its q is one-hot at itself (the authors' convention,
which keeps the rule exact: acceptance then has probability p(d)).

Relaxed acceptance (opt-in, not exact; LANTERN, arXiv 2410.03355, `models/ea_model_anole.py`): a
draft also counts the target mass of its nearest codebook neighbours in the VQ latent space, added
nearest first while the added mass stays <= delta: accept if u < p'(d) / q(d) with
p'(d) = p(d) + that mass. Rejections still draw from norm(max(0, p - q)). delta = 0 is exact SJD.

Group acceptance (opt-in, not exact; GSD, arXiv 2508.07747, `scheduler/jacobi_iteration_lumina_mgpt.py::
GroupSpeculativeSampler`): a draft d is tested as a group G of tokens the target finds about as
likely and the model embeds close by: accept if u < p(G) / q(G). G holds the tokens within
GROUP_RADIUS ranks of d in the target's order (GSD: [rank - 7, rank + 7) of the ascending sort),
whose target probability is within GROUP_PROB_GAP (0.15) of p(d) and whose input embedding is
within a squared distance of d's. GSD's distance bound, 0.5, is in Lumina-mGPT-7B's embedding units;
here it is the median squared distance between two image codes' embeddings of the model served (a
group keeps the nearer half), since an absolute bound means nothing across models. Rejections draw
from norm(max(0, p - q)), as in SJD and GSD. Where GSD's window would start below rank 0 it is cut
at 0 (GSD's slice then comes back empty and the draft is rejected).

Pitfalls of the authors' code avoided here: q is always the exact distribution a draft was drawn
from, under the same guidance and filters as verification; a residual that is all zero (possible only
through rounding, when rejection had probability ~0) falls back to p instead of dividing by zero.

The strategy (`SJD`, `SJDRunner`, at the end) runs through vLLM's speculative-decoding accounting
without a vLLM proposer: before each step the scheduler half gives a request `min(window, tokens
left) - 1` speculative-token slots; the runner half writes the image's drafts into them (the same
drafts into both guidance streams), reads logits at every fed token, verifies the drafts against the
guided, filtered, tempered targets and appends the committed tokens; vLLM rolls back the KV of the
rest (`num_computed_tokens -= rejected`). The image's Jacobi state (carried drafts and the
distributions they were drawn from) lives in the runner half between forwards. With
`draft_candidates` K, K - 1 more slots carry siblings of the first draft (`verify_with_siblings`):
the runner half feeds them at that draft's position under masked attention, and a forward that
commits one makes the next feed it again at its position (its key/value was written in a sibling's
slot), by a one-token rewind in the scheduler half.
"""
import math
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from vllm_visual_ar.families import image_layout
from vllm_visual_ar.samplers.coupling import CoupledTokens, check_coupled, check_flag, coupled_draw, random_codes
from vllm_visual_ar.samplers.load import WidthChoice
from vllm_visual_ar.samplers.sampling import exponential_noise, target_probs
from vllm_visual_ar.samplers.strategy import (DRAW_ONLY, Footprint, RowPlan, Strategy, StrategyRunner,
                                              whole_image_problem)

INITS = ("random", "horizontal")
DEFAULT_WINDOW = 16
MAX_CANDIDATES = 8  # a forward's first draft and its siblings (SJD-PAC's default tree: 3 per level)


def check_sjd_window(window) -> int:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (SJD: tokens per forward, 1 = raster), got {window!r}")
    return window


def check_candidates(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CANDIDATES:
        raise ValueError(f"draft_candidates must be an integer in 1..{MAX_CANDIDATES} (candidates for each forward's "
                         f"first draft; 1: the chain alone), got {value!r}")
    return value


def check_init(init) -> str:
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    return init


def draft_slots(window: int, tokens_left: int) -> int:
    """Drafts one forward verifies: the window, less x0, cut at the image's end."""
    return max(0, min(window, tokens_left) - 1)


def forward_drafts(window: int, image_tokens: int, done: int, committed: int) -> tuple[int, int]:
    """An SJD forward's (drafts verified, drafts accepted), from the tokens the image had before it
    and the tokens it committed: all but the last committed token are accepted drafts."""
    return draft_slots(window, image_tokens - done), committed - 1


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of probs [K, V] (exponential race: token i with probability p_i)."""
    return probs.div(exponential_noise(probs.shape, generator, probs.device, probs.dtype)).argmax(-1)


@dataclass
class Drafts:
    """Drafts for the next positions and the distributions they were drawn from."""
    tokens: list[int]
    q: torch.Tensor  # [len(tokens), V]

    @staticmethod
    def empty(vocab: int) -> "Drafts":
        return Drafts([], torch.zeros(0, vocab))


def fill_drafts(carried: Drafts, count: int, init: str, vocab: int, last_token: int, first_position: int,
                width: int, generator: torch.Generator | None, device="cpu", codes: int | None = None,
                placed=None, coupled_seed: int | None = None) -> Drafts:
    """`count` drafts for raster positions first_position .. : the carried ones first, then initialised.
    `width`: tokens per row (an end of line counted); `codes`: the drafts drawn at random are codes
    0..codes-1 (default: the whole vocabulary); `placed(position)`: True where the layout places a
    token (an end of line, an image end), drafted as index `codes` with q one-hot there, so that it is
    always accepted. `coupled_seed`: the random drafts are the image's `coupling.random_codes`, not
    draws from `generator`."""
    codes = vocab if codes is None else codes
    tokens, q = list(carried.tokens[:count]), carried.q[:count]
    fresh = count - len(tokens)
    if fresh <= 0:
        return Drafts(tokens, q)
    new: list[int] = []
    first_fresh = first_position + len(tokens)
    randoms = (torch.randint(codes, (fresh,), generator=generator, device=device).tolist() if coupled_seed is None
               else random_codes(coupled_seed, range(first_fresh, first_fresh + fresh), codes))
    for i in range(fresh):
        position = first_fresh + i
        left = (tokens + new)[-1] if tokens or new else last_token
        if placed is not None and placed(position):
            new.append(codes)
        else:
            horizontal = init == "horizontal" and position % width != 0 and left < codes
            new.append(left if horizontal else randoms[i])
    one_hot = torch.nn.functional.one_hot(torch.tensor(new, dtype=torch.long, device=device), vocab).float()
    return Drafts(tokens + new, torch.cat([q.to(one_hot.device), one_hot]))


def check_relaxed(delta, neighbours) -> tuple[float | None, int | None]:
    if delta is None:
        if neighbours is not None:
            raise ValueError("relaxed_neighbours applies to relaxed acceptance: set relaxed_delta too")
        return None, None
    if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 <= delta <= 1:
        raise ValueError(f"relaxed_delta must be a number in [0, 1], got {delta!r}")
    if neighbours is not None and (isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 1):
        raise ValueError(f"relaxed_neighbours must be an integer >= 1, got {neighbours!r}")
    return float(delta), neighbours


def latent_neighbours(codebook: torch.Tensor, k: int) -> torch.Tensor:
    """codebook [V, D] (the VQ's code vectors) -> [V, k] each code's k nearest other codes, nearest first."""
    k = min(k, codebook.shape[0] - 1)
    rows = []
    for chunk in codebook.split(4096):
        d = torch.cdist(chunk.float(), codebook.float())
        d[torch.arange(len(chunk)), torch.arange(len(rows) * 4096, len(rows) * 4096 + len(chunk))] = float("inf")
        rows.append(d.topk(k, largest=False).indices)
    return torch.cat(rows)


def relaxed_mass(p: torch.Tensor, tokens: torch.Tensor, neighbours: torch.Tensor, delta: float) -> torch.Tensor:
    """p [n, V] targets, tokens [n] -> [n] p(token) plus its neighbours' mass, nearest first, up to delta."""
    mass = p.gather(1, neighbours[tokens])  # [n, k]
    added = (mass * (mass.cumsum(1) <= delta)).sum(1)
    return p.gather(1, tokens[:, None])[:, 0] + added


GROUP_RADIUS = 7
GROUP_PROB_GAP = 0.15


def group_ratio(p: torch.Tensor, q: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor,
                bound: float) -> torch.Tensor:
    """GSD's acceptance ratio p(G) / q(G) for drafts `tokens` [n] with targets p and draft
    distributions q [n, V]; embeddings [V, D] (a NaN row: an index no code is near, the layout's
    placed token), bound: the squared embedding distance a group member stays within."""
    order = p.argsort(dim=1)  # ascending, as GSD sorts the target logits
    ranks_of = torch.empty_like(order).scatter_(1, order, torch.arange(p.shape[1], device=p.device).expand_as(order))
    rank = ranks_of.gather(1, tokens[:, None])  # [n, 1]: the inverse permutation, not a second sort
    offsets = torch.arange(-GROUP_RADIUS, GROUP_RADIUS, device=p.device)
    ranks = rank + offsets  # [n, 2 * GROUP_RADIUS]
    members = order.gather(1, ranks.clamp(0, p.shape[1] - 1))
    pm, qm = p.gather(1, members), q.gather(1, members)
    near = (embeddings[members] - embeddings[tokens][:, None]).pow(2).sum(-1) < bound
    alike = (pm - p.gather(1, tokens[:, None])).abs() < GROUP_PROB_GAP
    keep = (ranks >= 0) & (ranks < p.shape[1]) & near & alike | (offsets == 0)  # d itself always counts
    return (pm * keep).sum(1) / (qm * keep).sum(1)


def group_bound(embeddings: torch.Tensor, sample: int = 2048) -> float:
    """The median squared distance between two codes' embeddings [codes, D] (over a fixed sample
    of at most `sample` codes): group acceptance's distance bound."""
    rows = embeddings.float()
    if len(rows) > sample:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:sample].to(rows.device)]
    d = torch.cdist(rows, rows).pow(2)
    return float(d[~torch.eye(len(rows), dtype=torch.bool, device=d.device)].median())


class GroupTables:
    """Group acceptance's (embeddings [space, D], distance bound) per layout, for a runner's model: the
    model's input embeddings of the image codes, and a NaN row for the placed-token index (near
    nothing) when the verified space has one."""

    def __init__(self, model, device):
        self.model, self.device = model, device
        self._tables: dict[tuple[int, int], tuple[torch.Tensor, float]] = {}

    def __call__(self, layout, space: int) -> tuple[torch.Tensor, float]:
        key = (layout.image_token_ids.start, space)
        if key not in self._tables:
            start = layout.image_token_ids.start
            with torch.no_grad():
                embeddings = self.model.embed_input_ids(
                    torch.arange(start, start + layout.codebook_size, device=self.device)).float()
            bound = group_bound(embeddings)
            if space > layout.codebook_size:
                embeddings = torch.cat([embeddings, embeddings.new_full((1, embeddings.shape[1]), math.nan)])
            self._tables[key] = (embeddings, bound)
        return self._tables[key]


def residual_draw(p: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from norm(max(0, p - q)); a row whose residual is all zero (only through
    rounding, when rejection had probability ~0) draws from p."""
    residual = torch.clamp(p - q, min=0)
    total = residual.sum(-1, keepdim=True)
    return draw(torch.where(total > 0, residual / total.clamp(min=1e-30), p), generator)


def verify(p: torch.Tensor, drafts: Drafts, generator: torch.Generator | None,
           relaxed: tuple[torch.Tensor, float] | None = None, continued: bool = False,
           group: tuple[torch.Tensor, float] | None = None) -> tuple[list[int], Drafts]:
    """p [K, V]: targets at the K fed inputs (x0 and K-1 drafts). -> (committed tokens, 1..K; the
    drafts carried into the next window). All K-1 acceptance tests are drawn at once; only the
    first rejection matters. relaxed = (latent neighbours [V, k], delta) for relaxed acceptance;
    group = (embeddings [V, D], distance bound) for group acceptance (`group_ratio`).

    continued: SJD-PAC's adaptive continuation (`scheduler/sjd_pac_iteration_lumina_mgpt.py`, the
    chain without tree siblings). After the first rejection the later drafts are tested against
    their targets from this forward (whose context held the rejected draft): a draft that passes
    is carried as it is, one that fails is replaced by a draw from its residual. Either way the
    carried token is an exact sample of that target, which is carried as its q, as plain SJD carries
    a fresh sample; but a draft that still fits stays, so the window keeps what it had built. Only the
    accepted prefix and the resampled token are committed, as in SJD. (`verify_batch` for one image.)"""
    return verify_batch([p], [drafts], [generator], [continued], [given_ratio(p, drafts, relaxed, group)])[0]


def given_ratio(p: torch.Tensor, drafts: Drafts, relaxed: tuple[torch.Tensor, float] | None = None,
                group: tuple[torch.Tensor, float] | None = None) -> torch.Tensor | None:
    """The acceptance ratios [K-1] of a window's drafts under relaxed or group acceptance (`verify`);
    None for SJD's own."""
    if relaxed is None and group is None:
        return None
    k = p.shape[0]
    tokens = torch.tensor(drafts.tokens, dtype=torch.long, device=p.device)
    q = drafts.q.to(p.device)
    if group is not None:
        return group_ratio(p[: k - 1], q, tokens, group[0].to(p.device), group[1])
    rows = torch.arange(k - 1, device=p.device)
    return relaxed_mass(p[: k - 1], tokens, relaxed[0].to(p.device), relaxed[1]) / q[rows, tokens]


def verify_batch(ps: list[torch.Tensor], drafts: list[Drafts], generators: list, continued: list[bool],
                 ratios: list[torch.Tensor | None] | None = None) -> list[tuple[list[int], Drafts]]:
    """`verify` of several images' forwards at once: ps[i] [k_i, V] the targets of image i, drafts[i]
    its k_i - 1 drafts, tested by SJD's ratio p(d) / q(d), or where `ratios[i]` is given by it [k_i - 1]
    (relaxed or group acceptance; continuation still keeps a later draft by SJD's own ratio).

    Each image draws from its own generator, in a fixed order and shapes: its uniforms, then in one
    block the noise of the tokens it draws, in their order (the resampled token, with continuation a
    residual draw for each later draft, then the samples of the targets: the bonus token, the later
    targets' fresh samples or with continuation the last target's), so its result does not depend
    on what else is in the batch. Entries that share a generator (ZipAR x SJD's rows of one image)
    draw all their uniforms first, then their blocks, in entry order. The arithmetic around the
    draws runs once for the whole batch: one acceptance test of every draft, one exponential race
    for every token drawn (per image it was most of an SJD step's own work under load)."""
    device = ps[0].device
    ks = [p.shape[0] for p in ps]
    us = [torch.rand(k, generator=g, device=device) for k, g in zip(ks, generators)]
    one = len(ps) == 1
    p = ps[0] if one else torch.cat(ps)
    q = drafts[0].q.to(device) if one else torch.cat([d.q.to(device) for d in drafts])
    tokens = [t for d in drafts for t in d.tokens]
    assert len(tokens) == sum(ks) - len(ks), "an image's forward verifies k - 1 drafts"
    starts = [0] if one else np.cumsum([0] + ks[:-1]).tolist()
    passes = accepted = []
    if tokens:
        index = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]
        p_at_drafts = p[:-1] if one else p[torch.from_numpy(
            np.concatenate([np.arange(s, s + k - 1) for s, k in zip(starts, ks)])).to(device)]
        ratio = p_at_drafts.gather(1, index)[:, 0] / q.gather(1, index)[:, 0]
        u = us[0][:-1] if one else torch.cat([u[: k - 1] for u, k in zip(us, ks)])
        passes = accepted = (u < ratio).tolist()  # SJD's own test: u < min(1, r) is u < r for u in [0, 1)
        if ratios is not None and any(r is not None for r in ratios):  # SJD's own ratio where none is given
            own = ratio.split([k - 1 for k in ks])
            accepted = (u < torch.cat([own[i] if r is None else r.to(device) for i, r in enumerate(ratios)])).tolist()
    # Per image, the tokens it draws: from residuals norm(max(0, p - q)) (p rows a .. b, q rows from
    # c), then from targets (p rows a .. b); the noise of both in one block.
    vocab, dtype = p.shape[1], p.dtype
    plans, residual_rows, target_rows, noise = [], [], [], []
    first_q = 0
    for i, (start, k, g) in enumerate(zip(starts, ks, generators)):
        tested = accepted[first_q: first_q + k - 1]
        if all(tested):  # a bonus token from the last target
            plans.append((None, 0))
            target_rows.append((start + k - 1, start + k))
            noise.append(exponential_noise((1, vocab), g, device, dtype))
        else:
            j = tested.index(False) + 1  # the first rejected draft, d_j: resampled from its residual
            # Jacobi: positions j+1 .. K were predicted from the rejected prefix; samples of their
            # targets carry over, or with continuation the later drafts that pass, each other one
            # redrawn from its residual, and a sample of the last target
            later = (k - 1 - j) if continued[i] else 0
            plans.append((j, later))
            residual_rows.append((start + j - 1, start + j + later, first_q + j - 1))
            target_rows.append((start + k - 1, start + k) if later else (start + j, start + k))
            noise.append(exponential_noise((k - j + 1, vocab), g, device, dtype))
        first_q += k - 1
    pieces = []
    if residual_rows:  # a residual all zero (only through rounding) draws from p
        rp = _rows(p, [(a, b) for a, b, _ in residual_rows])
        residual = torch.clamp(rp - _rows(q, [(c, c + b - a) for a, b, c in residual_rows]), min=0)
        total = residual.sum(-1, keepdim=True)
        residual = torch.where(total > 0, residual / total.clamp(min=1e-30), rp)
    r = 0
    for (j, later), (a, b) in zip(plans, target_rows):
        if j is not None:
            pieces.append(residual[r: r + 1 + later])
            r += 1 + later
        pieces.append(p[a:b])
    probs = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    drawn = probs.div(noise[0] if len(noise) == 1 else torch.cat(noise)).argmax(-1).tolist()
    out, at, first_q = [], 0, 0
    for i, (k, (j, later)) in enumerate(zip(ks, plans)):
        own = drafts[i].tokens
        if j is None:
            out.append((own + [drawn[at]], Drafts.empty(vocab)))
            at += 1
        else:
            block = drawn[at: at + k - j + 1]
            at += k - j + 1
            if later:  # continuation: each later draft kept where it passes SJD's test, else its residual's draw
                kept = passes[first_q + j: first_q + k - 1]
                carried = [own[j + m] if kept[m] else block[1 + m] for m in range(later)] + [block[-1]]
            else:
                carried = block[1:]
            out.append((own[: j - 1] + [block[0]], Drafts(carried, ps[i][j:])))
        first_q += k - 1
    return out


def _rows(x: torch.Tensor, spans: list[tuple[int, int]]) -> torch.Tensor:
    return x[spans[0][0]: spans[0][1]] if len(spans) == 1 else torch.cat([x[a:b] for a, b in spans])


def carry_past(p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, generator: torch.Generator | None,
               continued: bool, u: torch.Tensor | None = None) -> torch.Tensor:
    """The next window's drafts for the positions past a forward's committed tokens: p [n + 1, V]
    their targets from this forward, tokens [n] / q [n, V] the drafts that stood there; fresh samples
    of the targets (SJD), or with `continued` the old drafts kept where they pass
    (`continued_carry`, u [n] their uniforms, drawn here if not given)."""
    if continued and len(tokens):  # drafts stood past the committed ones: keep those that pass
        if u is None:
            u = torch.rand(len(tokens), generator=generator, device=p.device)
        return continued_carry(p, tokens, q, u, generator)
    return draw(p, generator)


def continued_carry(p: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor, u: torch.Tensor,
                    generator: torch.Generator | None) -> torch.Tensor:
    """Adaptive continuation's carry (`verify`): the n drafts past a rejection, tokens [n] drawn from
    q [n, V], each kept where it passes its test against this forward's target (u [n] uniforms), else
    replaced by a draw from its residual; then a draw from the last target. p: [n + 1, V]. Every
    carried token is an exact sample of its target."""
    rows = torch.arange(len(tokens), device=p.device)
    keep = u < torch.clamp(p[rows, tokens] / q[rows, tokens], max=1.0)
    return torch.cat([torch.where(keep, tokens, residual_draw(p[:-1], q, generator)), draw(p[-1:], generator)])


def draw_candidates(q: torch.Tensor, first: int, count: int, generator: torch.Generator | None) -> list[int]:
    """Up to `count` - 1 more candidates for a position whose draft `first` was drawn from q [V]:
    drawn from q without replacement, `first` excluded (fewer where q has fewer other tokens; none
    where q is one-hot, as for a draft initialised rather than sampled)."""
    rest = q.clone()
    rest[first] = 0
    n = min(count - 1, int((rest > 0).sum()))
    if n <= 0:
        return []
    return torch.multinomial(rest, n, replacement=False, generator=generator).tolist()


def verify_candidates(p: torch.Tensor, candidates: list[int], q: torch.Tensor,
                      generator: torch.Generator | None) -> tuple[int, int | None]:
    """Several candidates for one position, drawn from q [V] without replacement, against the target
    p [V]: SpecInfer's / multi-candidate speculative sampling's recursive rule (Yang et al. 2024,
    the without-replacement variant), which SJD-PAC's proactive drafting applies to its siblings
    (`scheduler/sjd_pac_iteration_lumina_mgpt.py`, `SJDPACSpeculativeSampler.__call__`). Candidate i
    is accepted with probability min(1, p_i(x_i) / q_i(x_i)); on rejection p_{i+1} = norm(max(p_i -
    q_i, 0)) and q_{i+1} is q_i without x_i, renormalised. If every candidate is rejected the token
    is drawn from the last residual. -> (the token, the index of the accepted candidate or None);
    the token is an exact sample of p."""
    p, q = p.clone(), q.to(p.device).clone()
    u = torch.rand(len(candidates), generator=generator, device=p.device)
    for i, x in enumerate(candidates):
        if u[i] * q[x] < p[x]:
            return x, i
        residual = torch.clamp(p - q, min=0)
        total = residual.sum()
        p = residual / total if total > 0 else p  # all-zero only through rounding: p is then ~q
        q[x] = 0
        if q.sum() <= 0:
            break
        q = q / q.sum()
    return int(draw(p[None], generator)[0]), None


def verify_with_siblings(p: torch.Tensor, siblings_p: torch.Tensor, drafts: Drafts, siblings: list[int],
                         generator: torch.Generator | None, continued: bool = False
                         ) -> tuple[list[int], Drafts, int | None]:
    """A forward's verification when the first draft has sibling candidates (SJD-PAC's proactive
    drafting cut to its first level; `draw_candidates`). p [k, V]: targets at the chain's k inputs
    (x0 and k-1 drafts); siblings_p [len(siblings), V]: the targets each sibling's own query gives
    (its successor's). The first position is verified by the multi-candidate rule
    (`verify_candidates`) over the chain's draft and then the siblings. If the chain's draft wins,
    the chain is verified on from it (`verify`); otherwise the position holds a sibling or a residual
    draw, and an accepted sibling is followed by a draw from its own target. The chain's later
    targets were computed past the losing draft, so they are carried as plain SJD carries the
    positions after a rejection (with `continued`, SJD-PAC's rule: its drafts kept where they pass,
    `continued_carry`). -> (committed tokens, carried drafts, index of the accepted sibling or None)."""
    k = p.shape[0]
    token, chosen = verify_candidates(p[0], drafts.tokens[:1] + siblings, drafts.q[0], generator)
    if chosen == 0:  # the chain's own draft: verify the chain on from it
        rest, carried = verify(p[1:k], Drafts(drafts.tokens[1:], drafts.q[1:]), generator, continued=continued)
        return [token] + rest, carried, None
    committed = [token]
    sibling = None if chosen is None else chosen - 1
    if sibling is not None:  # the target its own output gives follows it
        committed.append(int(draw(siblings_p[sibling][None], generator)[0]))
    first = len(committed)  # positions first + 1 .. k are carried (targets p[first:k])
    later = torch.tensor(drafts.tokens[first:], dtype=torch.long, device=p.device)
    tokens = carry_past(p[first:k], later, drafts.q[first:].to(p.device), generator, continued)
    return committed, Drafts(tokens.tolist(), p[first:k]), sibling


def verify_prefix(p: torch.Tensor, drafts: Drafts, upto: int, generator: torch.Generator | None,
                  continued: bool = False, group: tuple[torch.Tensor, float] | None = None
                  ) -> tuple[list[int], Drafts]:
    """`verify` of the whole window, committing at most the first `upto` tokens (`held_back`)."""
    return held_back(verify(p, drafts, generator, continued=continued, group=group), p, upto)


def held_back(verified: tuple[list[int], Drafts], p: torch.Tensor, upto: int) -> tuple[list[int], Drafts]:
    """A verified window (`verify`) of which only the first `upto` tokens may be committed yet (ZipAR x
    SJD: the row above has not reached the rest). The tokens the test settled past them (accepted
    drafts, the draw at the first rejection or the bonus) are exact samples of their targets p, so they
    lead the next window's drafts with p as their q, followed by the window's own carry: a row held
    back by the row above keeps what it verified rather than redrawing it, and the drafts after it
    keep the context they were predicted from."""
    committed, carried = verified
    if len(committed) <= upto:
        return verified
    return committed[:upto], Drafts(committed[upto:] + carried.tokens, p[upto:])


def verify_coupled(p: torch.Tensor, drafts: Drafts, drawn: torch.Tensor) -> tuple[list[int], Drafts]:
    """SJD with coupled draws (`coupling.py`). drawn [K]: the coupled draws from p at the K positions
    the forward predicts. The token committed at a position is always the coupled draw from its target,
    so the image is the one raster decoding draws with the same seed (exact by construction). A draft
    is accepted when it equals that draw; the first that does not is replaced by it. The coupled
    draws at the later positions (their context held the rejected draft) are the next window's
    drafts: with the same noise they change only where their distribution moved, so they settle
    once their context does. SCD's code (`jacobi_iteration_lumina_mgpt_GS.py`) couples the drafts
    the same way but keeps SJD's probabilistic test; matching the draw instead is what makes SJD's
    image equal raster's, at the cost of accepting a draft whose context is still moving a little
    less often (P[draw(p) = draw(q)] instead of 1 - TV(p, q))."""
    k = p.shape[0]
    assert len(drafts.tokens) == k - 1
    tokens = torch.tensor(drafts.tokens, dtype=torch.long, device=p.device)
    mismatch = (tokens != drawn[: k - 1]).nonzero()
    if len(mismatch) == 0:
        return drafts.tokens + [int(drawn[k - 1])], Drafts.empty(p.shape[1])
    i = int(mismatch[0])
    return drafts.tokens[:i] + [int(drawn[i])], Drafts(drawn[i + 1:].tolist(), p[i + 1:])


def targets_of(step, rows: list[int], logits: torch.Tensor, at: list[slice]) -> list[torch.Tensor]:
    """Each row's targets (`target_probs` of `logits[at[row]]`), the rows with the same sampling
    settings in one call."""
    groups: dict[tuple, list[int]] = {}
    for row in rows:
        params = step.state(row).sampling_params
        groups.setdefault((params.temperature, max(params.top_k or 0, 0), params.top_p), []).append(row)
    targets = {}
    for (temperature, top_k, top_p), members in groups.items():
        if len(members) == 1:
            targets[members[0]] = target_probs(logits[at[members[0]]], temperature, top_k, top_p)
            continue
        index = np.concatenate([np.arange(at[row].start, at[row].stop) for row in members])
        p = target_probs(logits[torch.from_numpy(index).to(logits.device)], temperature, top_k, top_p)
        first = 0
        for row in members:
            n = at[row].stop - at[row].start
            targets[row], first = p[first: first + n], first + n
    return [targets[row] for row in rows]


# -- the strategy: what vLLM's scheduler and the plugin's runner ask of SJD ----------------------------
# Layouts with tokens the engine places (an end of line after each row, the image end: Lumina-mGPT,
# Emu3) verify over the codes plus one index, `codes` = K, that stands for "the token the layout
# places here": at such a position the target is one-hot at K and the draft is K with q one-hot, so
# the draft is always accepted (the authors draft these positions at random and reject once per
# row, `get_eol_in_multitokens`; placing them is the same distribution, fewer rejections), and the
# Jacobi carry keeps K there. Committed indices become token ids by position.
@dataclass
class _Jacobi:
    """One image's Jacobi state between forwards (shared by its two guidance streams)."""
    carried: Drafts
    current: Drafts | None = None
    first: int = 0  # output index of current's first draft
    carried_at: int = 0  # output index of carried's first draft
    siblings: list[int] = field(default_factory=list)  # this forward's siblings of current's first draft


class SJDRunner(StrategyRunner):
    def __init__(self, *args):
        super().__init__(*args)
        self.images: dict[str, _Jacobi] = {}
        self._leads: dict[int, str] = {}  # this forward's sampling rows -> image id
        self._neighbours: dict[int, torch.Tensor] = {}  # k -> [codebook, k] latent neighbours (relaxed)
        self.groups = GroupTables(self.model, self.device)
        self.coupled = CoupledTokens(self.device)
        self._single: set[int] = set()  # this forward's coupled rows that draw one token
        self._refeeding: set[int] = set()  # this forward's sampling rows that committed a sibling

    @staticmethod
    def _space(layout) -> int:
        """The verified index space: the codes, plus K for placed tokens when the layout has any."""
        return layout.codebook_size + (layout.row_end is not None or bool(layout.image_end))

    @staticmethod
    def _token(layout, index: int, position: int) -> int:
        return layout.forced(position) if index == layout.codebook_size else layout.image_token_ids.start + index

    def takes_single(self, info):
        """A step at width 1 (load-aware) is vLLM's own, but for a coupled draw."""
        return bool(info.decoding.coupled)

    def prepare(self, step, rows):
        """Each image's drafts (carried Jacobi tail, then initialised), written into both streams;
        with `draft_candidates`, the first draft's siblings after them (`_siblings_plan`)."""
        images: dict[str, list] = {}  # image id -> [its sampling (lead) row and info, its other rows]
        plans, self._leads, self._single, self._refeeding = {}, {}, set(), set()
        # as lists: asked of every row in every step (under load, mostly rows at width 1)
        fed = np.diff(step.query_start).tolist()
        past_prompt = (step.computed >= step.prompt_lens).tolist()
        for row in rows:
            info = step.info(row)
            if past_prompt[row] and fed[row] > 1:  # x0 and fed - 1 drafts
                image = images.setdefault(info.image_id, [None, None, []])
                if image[0] is None and info.role != "uncond":
                    image[:2] = row, info
                else:
                    image[2].append(row)
            elif info.decoding.coupled:  # one token, drawn coupled (else vLLM's own draw)
                plans[row] = DRAW_ONLY
                self._single.add(row)
        for image_id, (lead, info, others) in images.items():
            if lead is None:  # only an uncond stream (the scheduler never splits a pair)
                lead, others = others[0], others[1:]
                info = step.info(lead)
            streams = [lead, *others]
            layout = self.layout_of(info)
            codes, space = layout.codebook_size, self._space(layout)
            if (state := self.images.get(image_id)) is None:
                state = self.images[image_id] = _Jacobi(Drafts.empty(space))
            history = step.state(lead).output_token_ids
            start, end = step.fed(lead)
            # 1 where the forward first feeds again the sibling the last one committed (its key/value
            # was computed in a sibling's slot; the scheduler half rewound vLLM's count over it)
            refeed = int(step.prompt_lens[lead]) + len(history) - 1 - int(step.computed[lead])
            n = end - start - refeed  # x0, the chain's drafts and the siblings' slots
            # the siblings' slots follow the window's drafts (vLLM cuts spec slots past max_model_len
            # from the end: siblings first)
            extra = n - 1 - min(n - 1, draft_slots(info.decoding.window, layout.num_tokens - len(history)))
            last = history[-1] - layout.image_token_ids.start
            state.first = len(history)
            if (behind := state.first - state.carried_at) > 0:
                # Steps at width 1 (load-aware) committed tokens by vLLM's own path since the carry
                # was made: its drafts for those positions are spent, the rest still line up.
                state.carried = Drafts(state.carried.tokens[behind:], state.carried.q[behind:])
            state.current = fill_drafts(state.carried, n - extra - 1, info.decoding.init, space,
                                        last if 0 <= last < codes else codes, len(history), layout.row_stride,
                                        step.generator(lead), self.device, codes,
                                        lambda position: layout.forced(position) is not None,
                                        self.coupled.seed(step, lead) if info.decoding.coupled else None)
            first_id = layout.image_token_ids.start
            tokens = ([first_id + d for d in state.current.tokens] if space == codes else
                      [self._token(layout, d, state.first + i) for i, d in enumerate(state.current.tokens)])
            state.siblings = []
            plan = (self._siblings_plan(step, lead, state, layout, refeed, n - extra, extra, tokens) if extra
                    else RowPlan(range(refeed, end - start), slot_tokens=tokens))
            for row in streams:
                if step.fed(row)[1] - step.fed(row)[0] != end - start:
                    raise RuntimeError(f"SJD image {image_id}: its streams got different numbers of draft slots")
                plans[row] = plan
            self._leads[lead] = image_id
        return plans

    def _siblings_plan(self, step, lead, state, layout, refeed, chain, extra, tokens) -> RowPlan:
        """The forward of an image with `draft_candidates`: [the sibling fed again, if any] x0, the
        chain's drafts, then `extra` slots for the first draft's siblings (`draw_candidates`; none
        where that draft was initialised, not sampled: its q is one-hot). A sibling sits at the first
        draft's position and sees the committed tokens, x0 and itself, never the chain (masked
        attention); slots no sibling fills repeat the first draft and are not read."""
        state.siblings = draw_candidates(state.current.q[0], state.current.tokens[0], extra + 1, step.generator(lead))
        pad = state.siblings + [state.current.tokens[0]] * (extra - len(state.siblings))
        computed = int(step.computed[lead])
        x0 = computed + refeed  # x0's index in the request's sequence
        positions = [*range(computed, x0 + chain), *[x0 + 1] * extra]
        visible = None
        if state.siblings:
            first_sibling = x0 + chain

            def visible(q, kv):
                seen = kv[None, :] <= q[:, None]
                siblings = q >= first_sibling
                seen[siblings] = (kv[None, :] <= x0) | (kv[None, :] == q[siblings][:, None])
                return seen

        return RowPlan(range(refeed, refeed + chain + extra), positions=positions, visible=visible,
                       slot_tokens=tokens + [self._token(layout, d, state.first) for d in pad])

    def emit(self, step, rows, logits, at):
        """Verify each image's drafts against its (guided) targets; carry the Jacobi tail. The targets
        of rows with the same sampling settings are computed together, and the images that are neither
        coupled nor with siblings are verified together (`verify_batch`; relaxed and group acceptance
        pass their ratios, `given_ratio`)."""
        single = [row for row in rows if row in self._single]
        out = self.coupled.tokens(step, single, logits, at, self.layout_of) if single else {}
        verifying = [row for row in rows if row not in self._single]
        together = []  # (row, targets, state, layout, continued, given ratio) for `verify_batch`
        for row, p in zip(verifying, targets_of(step, verifying, logits, at)):
            info = step.info(row)
            layout = self.layout_of(info)
            state = self.images[self._leads[row]]
            k = len(state.current.tokens) + 1  # the chain's targets; the siblings' follow
            space = self._space(layout)
            if space > p.shape[1]:
                # Targets at placed positions: all mass on K (position first + k is predicted by input k).
                p = torch.nn.functional.pad(p, (0, space - p.shape[1]))
                for i in range(k):
                    if layout.forced(state.first + i) is not None:
                        p[i].zero_()[layout.codebook_size] = 1.0
            decoding = info.decoding
            if decoding.coupled:
                positions = range(state.first, state.first + p.shape[0])  # input k predicts first + k
                drawn = coupled_draw(p, [self.coupled.seed(step, row)] * len(positions), positions,
                                     layout.codebook_size)
                committed, state.carried = verify_coupled(p, state.current, drawn)
            elif state.siblings:
                committed, state.carried, sibling = verify_with_siblings(
                    p[:k], p[k:], state.current, state.siblings, step.generator(row),
                    continued=bool(decoding.continue_after_reject))
                if sibling is not None:  # its key/value sits in its own slot: the next forward feeds it again
                    self._refeeding.add(row)
            else:
                relaxed = None if decoding.relaxed_delta is None else (
                    self._latent_neighbours(decoding.relaxed_neighbours), decoding.relaxed_delta)
                group = self.groups(layout, space) if decoding.group_acceptance else None
                together.append((row, p[:k], state, layout, bool(decoding.continue_after_reject),
                                 given_ratio(p[:k], state.current, relaxed, group)))
                continue
            out[row] = self._committed(state, layout, committed)
        if together:
            batch_rows, ps, states, layouts, continued, ratios = zip(*together)
            verified = verify_batch(list(ps), [state.current for state in states],
                                    [step.generator(row) for row in batch_rows], list(continued), list(ratios))
            for row, state, layout, (committed, state.carried) in zip(batch_rows, states, layouts, verified):
                out[row] = self._committed(state, layout, committed)
        return out

    def _committed(self, state: _Jacobi, layout, committed: list[int]) -> list[int]:
        """The token ids of the indices a forward committed, the image's Jacobi state moved past them."""
        state.carried_at = state.first + len(committed)
        return [self._token(layout, d, state.first + i) for i, d in enumerate(committed)]

    def report(self, step, row):
        """True where the forward committed a sibling (`SJD.runner_report`)."""
        return True if row in self._refeeding else None

    def forget(self, req_id, info):
        if info is not None:
            self.images.pop(info.image_id, None)
            self.coupled.seeds.forget(info.image_id)

    def _latent_neighbours(self, k: int | None) -> torch.Tensor:
        """Each image code's k nearest codes in the VQ's latent space (relaxed acceptance); k
        defaults to LlamaGen/LANTERN's share, 1000 of 16384 codes."""
        cfg, codes = self.config, self.layout.codebook_size
        k = min(k or max(1, round(codes * 1000 / 16384)), max(1, codes - 1))
        if k not in self._neighbours:
            if len(self._neighbours) >= 4:  # clients choose k: keep a few tables, not one per k ever asked
                self._neighbours.pop(next(iter(self._neighbours)))
            from safetensors.torch import load_file

            from vllm_visual_ar.model_executors.vq import VQ_WEIGHTS

            codebook = load_file(os.path.join(self.model_dir, VQ_WEIGHTS))["quantize.embedding.weight"]
            if cfg.vq.get("codebook_l2_norm", True):
                codebook = torch.nn.functional.normalize(codebook.float(), dim=-1)
            self._neighbours[k] = latent_neighbours(codebook, k).to(self.device)
        return self._neighbours[k]


_PRIOR = math.log(16)  # the slope's prior: worth one forward at width 16
_FADE = 0.95  # the weight a forward's yield evidence keeps per later forward (about the last 20 count)


class SJD(Strategy):
    fields = ("window", "init", "relaxed_delta", "relaxed_neighbours", "coupled", "continue_after_reject",
              "load_aware", "group_acceptance", "draft_candidates")
    runner = SJDRunner
    uses_spec_slots = True

    @classmethod
    def checked(cls, decoding):
        delta, neighbours = check_relaxed(decoding.relaxed_delta, decoding.relaxed_neighbours)
        coupled = check_coupled(decoding.coupled)
        if coupled and delta is not None:
            raise ValueError("coupled applies to exact SJD: relaxed acceptance (relaxed_delta) is a probabilistic "
                             "test, coupled draws verify a draft by matching")
        grouped = check_flag(decoding.group_acceptance, "group_acceptance")
        if grouped and (coupled or delta is not None):
            raise ValueError("group_acceptance is a probabilistic test of its own: it applies to plain SJD, "
                             "not with coupled or relaxed_delta")
        continued = check_flag(decoding.continue_after_reject, "continue_after_reject")
        if continued and coupled:
            raise ValueError("continue_after_reject and coupled are two ways of keeping the drafts after a "
                             "rejection: choose one")
        load_aware = check_flag(decoding.load_aware, "load_aware")
        candidates = check_candidates(decoding.draft_candidates)
        if candidates is not None and candidates > 1 and (coupled or delta is not None or grouped or load_aware):
            raise ValueError("draft_candidates applies to SJD's own test (with or without continue_after_reject), "
                             "not with coupled, relaxed_delta, group_acceptance or load_aware")
        return {"load_aware": load_aware, "draft_candidates": candidates,
                "window": check_sjd_window(DEFAULT_WINDOW if decoding.window is None else decoding.window),
                "init": check_init("random" if decoding.init is None else decoding.init),
                "relaxed_delta": delta, "relaxed_neighbours": neighbours, "coupled": coupled,
                "continue_after_reject": continued, "group_acceptance": grouped}

    @classmethod
    def fitted(cls, decoding, config, size=None):
        """A window beyond the image verifies the whole image; no code has more latent neighbours
        than the other codes."""
        layout = image_layout(config, size)
        neighbours = decoding.relaxed_neighbours
        if neighbours is not None:
            neighbours = min(neighbours, max(1, layout.codebook_size - 1))
        return replace(decoding, window=min(decoding.window, layout.num_tokens), relaxed_neighbours=neighbours)

    @classmethod
    def problem(cls, config, decoding):
        if problem := super().problem(config, decoding):
            return problem
        if decoding.relaxed_delta is not None and not isinstance(getattr(config, "vq", None), dict):
            # The latent neighbours come from a LlamaGen folder's VQ codebook (`_latent_neighbours`).
            return "relaxed acceptance (relaxed_delta) needs a LlamaGen model's VQ codebook; this model has none"
        layout = image_layout(config)
        if (decoding.draft_candidates or 1) > 1 and (layout.row_end is not None or layout.image_end):
            # the engine's siblings are checked against LlamaGen's reference loop only
            return ("draft_candidates applies to models whose images hold no placed tokens (LlamaGen); this "
                    "model's rows end with a token the engine places")
        return None

    @classmethod
    def draft_stats(cls, decoding, image_tokens, done, committed, width=None):
        return forward_drafts(width or decoding.window, image_tokens, done, committed)

    @property
    def _siblings(self) -> int:
        """Slots for the first draft's siblings in a forward that has drafts."""
        return (self.decoding.draft_candidates or 1) - 1

    def start(self, request):
        self._refeed = False  # the last forward committed a sibling (`runner_report`)
        self._seen = (0, 0)  # (output tokens, width) of the step being run
        self._accepted, self._log_widths = 0, 0.0  # drafts accepted, and the sum of ln(width) of their forwards
        return whole_image_problem(self.layout, request, self.decoding.strategy)

    def _observe(self, request) -> None:
        """Count the forwards run since the last count against the yield estimate; once per step (it
        then forgets the width). A step prepared wider than 1 is one forward, whose accepted drafts
        count against the log of its width. One prepared at width 1 may be followed by steps the
        scheduler held at width 1 without preparing them again (`load.WidthPolicy.holds`): each of
        those forwards committed one token, so the tokens appended since count them. The evidence
        fades by `_FADE` per forward, at any width: SJD's yield moves across an image (a plain
        background accepts long runs, a stroke few), and an image held at width 1 by a low estimate
        sees no new evidence, so only fading brings it back to the prior and to a wider step that
        measures it again (measured: without it, one lone image in a few ran all 256 forwards at
        width 1 after a poor start)."""
        outputs, width = self._seen
        if width:
            committed = request.num_output_tokens - outputs
            fade = _FADE if width > 1 else _FADE ** max(committed, 1)
            self._accepted *= fade
            self._log_widths *= fade
            if width > 1 and committed > 0:
                self._accepted += committed - 1
                self._log_widths += math.log(width)
            self._seen = (outputs, 0)

    def width_choice(self, request):
        """For a load-aware request: its window as the ceiling, and its yield slope k (tokens per
        forward 1 + k ln w, `load.py`) from its recent forwards (`_observe`), with a prior of one
        forward at k = 0.7 (the embedded model's SJD at 16-32)."""
        self._observe(request)
        left = request.max_tokens - request.num_output_tokens
        if not self.decoding.load_aware or request.num_computed_tokens < request.num_prompt_tokens or left <= 1:
            return None
        slope = (self._accepted + 0.7 * _PRIOR) / (self._log_widths + _PRIOR)
        return WidthChoice(min(self.decoding.window, left), slope)

    def footprint(self, output_tokens):
        window = min(self.decoding.window, output_tokens)  # a longer window verifies no more than the image
        # A load-aware image reserves width 2 of the step budget; the scheduler fits wider steps into
        # what is spare (`load.cap_to_budget`). Its KV look-ahead is the whole window.
        # Siblings add their slots, and a forward after one was committed feeds it again.
        widest = min(window, 2) if self.decoding.load_aware else window + self._siblings + bool(self._siblings)
        return Footprint(output_tokens, widest, window + self._siblings)

    def before_step(self, request, width=None):
        """Draft slots for the forward, once past the prompt: the runner half fills them; `width`
        (the load-aware policy's) narrows the window for this step. The scheduler asks only one
        stream of a pair for its `width_choice`: the other counts the last step's yield here."""
        self._observe(request)
        if self._refeed:  # a committed sibling's key/value is in its own slot: feed it again, at its position
            request.num_computed_tokens -= 1
            self._refeed = False
        if request.num_computed_tokens >= request.num_prompt_tokens:
            outputs = request.num_output_tokens
            slots = draft_slots(width or self.decoding.window, request.max_tokens - outputs)
            request.spec_token_ids = [0] * (slots + (self._siblings if slots else 0))
            self._seen = (outputs, slots + 1)

    def runner_report(self, request, report):
        """The runner half committed a sibling of the first draft (`SJDRunner.report`)."""
        self._refeed = bool(report)

    def step_width(self, request):
        """The tokens per stream the step just run fed: the window (the policy's, when load-aware),
        cut at the image's end; None for the prompt's forward."""
        return self._seen[1] or None
