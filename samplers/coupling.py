"""Coupled draws (SCD, arXiv 2510.24211, `lumina1/scheduler/jacobi_iteration_lumina_mgpt_GS.py`): the
noise that turns a distribution into a token is fixed per (image seed, raster position).

Sampling is the exponential race vLLM's sampler also runs: token = argmax_v p(v) / E(v) with E(v) ~
Exp(1), which picks v with probability p(v). Here E is not drawn afresh at every draw but derived
from the image's seed, the raster position and the code index alone, so:

- raster decoding of a coupled image is a deterministic function of its seed;
- a Jacobi draft redrawn at a position keeps its token unless the position's distribution moved
  (SCD's point: the drafts settle once their context does, and then they are accepted);
- SJD with coupled draws gives the very image raster decoding gives with the same seed (`sjd.py`
  verifies a draft by comparing it with the coupled draw from its target), so acceleration can be
  switched on without the picture changing.

Noise for one (seed, position, code): the code-th output of a SplitMix64 stream whose state starts at
splitmix64(seed) xor position, turned into a uniform of 53 bits and then E = -log(U). It is a pure
function of the three integers, computed for a whole batch of rows at once in int64 tensor arithmetic
(wrapping, as SplitMix64's does), so it costs next to nothing per row and gives the same noise on
every device.
"""
from __future__ import annotations

import random

import numpy as np
import torch

_MASK = (1 << 64) - 1
_GAMMA, _MIX1, _MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _int64(x: int) -> int:
    """The int64 with the same 64 bits as x mod 2**64."""
    x &= _MASK
    return x - (1 << 64) if x >> 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output function on int64 tensors (multiplications wrap mod 2**64)."""
    x = (x ^ _shr(x, 30)) * _int64(_MIX1)
    x = (x ^ _shr(x, 27)) * _int64(_MIX2)
    return x ^ _shr(x, 31)


def splitmix64(x: int) -> int:
    """One SplitMix64 step in plain Python: the definition `race_noise` computes in tensors."""
    x = (x + _GAMMA) & _MASK
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK
    return x ^ (x >> 31)


def _states(seeds, positions, device) -> torch.Tensor:
    """Each row's stream state, splitmix64(seed) ^ position: int64 [K]."""
    seeds = torch.tensor([_int64(s) for s in seeds], dtype=torch.int64, device=device)
    return _mix(seeds + _int64(_GAMMA)) ^ torch.as_tensor(positions, dtype=torch.int64, device=device)


def _uniforms(states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """U in (0, 1) for code k of a stream: the top 53 bits of splitmix64(state + k * gamma), moved off
    0 by half a step (states and codes broadcast together), float64."""
    bits = _shr(_mix(states + (codes + 1) * _int64(_GAMMA)), 11)
    return (bits.double() + 0.5) * 2.0 ** -53


def _exponentials(states: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """-log(U) for code k of a stream."""
    return _uniforms(states, codes).log_().neg_().float()


def race_noise(seeds, positions, codes: int, device="cpu") -> torch.Tensor:
    """Exp(1) noise [K, codes]: row i is the stream of (seeds[i], positions[i]), one entry per code."""
    return _exponentials(_states(seeds, positions, device)[:, None], torch.arange(codes, device=device)[None, :])


def coupled_draw(probs: torch.Tensor, seeds, positions, codes: int | None = None) -> torch.Tensor:
    """probs [K, W] -> one index per row, argmax p / E: E is row i's race noise (seeds[i],
    positions[i]) over the first `codes` indices (default all) and 1 past them (an index space with
    extra entries, such as SJD's "placed token"); a one-hot row gives its index. An index of
    probability 0 scores 0 whatever its noise, so where the rows' support is a small part of them
    (top-k sampling over a large codebook) the noise is computed on the support alone: the same
    scores, at a fraction of the hashing. On CPU the hash runs in numpy (`_coupled_draw_host`)."""
    codes = probs.shape[1] if codes is None else codes
    draw = _coupled_draw_host if probs.device.type == "cpu" else _coupled_draw_tensors
    return draw(probs, seeds, positions, codes)


def _coupled_draw_tensors(probs: torch.Tensor, seeds, positions, codes: int) -> torch.Tensor:
    """`coupled_draw` in tensor arithmetic on the probabilities' device."""
    states = _states(seeds, positions, probs.device)
    row, code = (probs > 0).nonzero(as_tuple=True)
    if 4 * len(code) <= probs.numel():
        noise = torch.where(code < codes, _exponentials(states[row], code), 1.0)
        score = torch.zeros_like(probs)
        score[row, code] = probs[row, code] / noise
    else:
        every = torch.arange(probs.shape[1], device=probs.device)[None, :]
        score = probs / torch.where(every < codes, _exponentials(states[:, None], every), 1.0)
    return score.argmax(-1)


def _coupled_draw_host(probs: torch.Tensor, seeds, positions, codes: int) -> torch.Tensor:
    """`coupled_draw` for CPU tensors, with the hash in numpy's uint64 arithmetic (it wraps as
    SplitMix64's does): the same bits, and the same float32 scores, as the tensor code, at a fifth of
    its cost for the one to a few dozen rows a step draws, where each torch call's dispatch costs more
    than its arithmetic (measured here: 94 us against about 25 for one row of 256 codes, top-k 32)."""
    p = probs.detach().numpy()
    seeds = np.array([s & _MASK for s in seeds], dtype=np.uint64)
    states = _mix_host(seeds + np.uint64(_GAMMA)) ^ np.asarray(positions, dtype=np.uint64)
    row, code = np.nonzero(p > 0)
    if 4 * len(code) <= p.size:
        score = np.zeros_like(p)
        score[row, code] = p[row, code] / _exponentials_host(states[row], code, codes)
    else:
        every = np.arange(p.shape[1])
        score = p / _exponentials_host(states[:, None], every[None, :], codes)
    return torch.from_numpy(score.argmax(-1))


def _mix_host(x: np.ndarray) -> np.ndarray:
    """`_mix` on uint64 arrays."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_MIX1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_MIX2)
    return x ^ (x >> np.uint64(31))


def _exponentials_host(states: np.ndarray, codes: np.ndarray, n_codes: int) -> np.ndarray:
    """`_exponentials` in numpy, float32, and 1 at indices past the first n_codes."""
    x = _mix_host(states + (codes.astype(np.uint64) + np.uint64(1)) * np.uint64(_GAMMA))
    noise = (-np.log(((x >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53)).astype(np.float32)
    return np.where(codes < n_codes, noise, np.float32(1.0))


_DRAFT_SALT = 0x2545F4914F6CDD1D


def random_codes(seed: int, positions, codes: int) -> list[int]:
    """A code in 0..codes-1 for each position, uniform and a pure function of (seed, position): the
    random Jacobi drafts of a coupled image. They come from a stream of their own (the seed salted),
    apart from the draws' noise, and not from the request's generator, which vLLM's sampler advances
    only in steps that are not all coupled draws: so a coupled image's forward count, like its tokens,
    depends on its seed alone, not on what shares its batches."""
    positions = list(positions)
    states = _states([splitmix64(seed ^ _DRAFT_SALT)] * len(positions), positions, "cpu")
    return (_uniforms(states, torch.zeros(1, dtype=torch.int64)) * codes).long().clamp_(max=codes - 1).tolist()


def random_seed() -> int:
    """The seed of a coupled image that was given none."""
    return random.getrandbits(32)


class ImageSeeds:
    """The coupling seed of each image a runner half is decoding: the request's seed, else a random one."""

    def __init__(self):
        self._seeds: dict[str, int] = {}

    def of(self, image_id: str, seed: int | None) -> int:
        if image_id not in self._seeds:
            self._seeds[image_id] = random_seed() if seed is None else seed
        return self._seeds[image_id]

    def forget(self, image_id: str) -> None:
        self._seeds.pop(image_id, None)


def check_flag(value, name: str) -> bool | None:
    """A decoding switch: True, or None for off (False given is off)."""
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return True if value else None


def check_coupled(coupled) -> bool | None:
    return check_flag(coupled, "coupled")


class CoupledTokens:
    """Coupled draws one position at a time, for a runner half: the forward that ends an image's
    prompt (its first token) and forwards that feed one token (planned `strategy.DRAW_ONLY`). In a batch
    with other rows vLLM's sampler still draws for these too (`worker.py`) and its draw is discarded;
    a batch of coupled draws alone skips it. Nothing of a coupled image reads the request's generator
    (its random drafts are `random_codes`), so which of the two happened changes nothing."""

    def __init__(self, device):
        self.seeds = ImageSeeds()

    def seed(self, step, row) -> int:
        return self.seeds.of(step.info(row).image_id, step.state(row).sampling_params.seed)

    def tokens(self, step, rows, logits, at, layout_of) -> dict[int, list[int]]:
        """The next token of each row: the one its layout places there, else the coupled draw from
        its (guided) target over the codes; rows with the same sampling settings are drawn together."""
        from vllm_visual_ar.samplers.sampling import target_probs

        out = {}
        groups: dict[tuple, list[tuple[int, int]]] = {}  # settings and layout -> (row, position)
        for row in rows:
            layout = layout_of(step.info(row))
            position = len(step.state(row).output_token_ids)
            forced = layout.forced(position)
            if forced is not None:
                out[row] = [forced]
                continue
            params = step.state(row).sampling_params
            key = (params.temperature, max(params.top_k or 0, 0), params.top_p, layout.codebook_size,
                   layout.image_token_ids.start)
            groups.setdefault(key, []).append((row, position))
        for (temperature, top_k, top_p, codes, first_id), members in groups.items():
            last = torch.tensor([at[row].stop - 1 for row, _ in members], device=logits.device)
            p = target_probs(logits[last], temperature, top_k, top_p)
            drawn = coupled_draw(p, [self.seed(step, row) for row, _ in members],
                                 [position for _, position in members]).tolist()
            out.update((row, [first_id + d]) for (row, _), d in zip(members, drawn))
        return out
