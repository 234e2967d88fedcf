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

Noise for the position of one image: a generator seeded with splitmix64(seed, position) draws
Exp(1) over the codes (`sampling.exponential_noise`). Different (seed, position) pairs get unrelated streams; the stream depends on
the device's generator (CPU and CUDA differ), as any seeded torch sampling does.
"""
from __future__ import annotations

import random

import torch

from vllm_visual_ar.samplers.sampling import exponential_noise

_MASK = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The generator seed of (image seed, raster position): 63 bits, unrelated for nearby pairs."""
    return _splitmix64(_splitmix64(seed) ^ position) >> 1


class PositionNoise:
    """Exp(1) noise per (seed, position, code), on one device; one generator, re-seeded per position."""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self._generator = torch.Generator(self.device)

    def race(self, seed: int, positions, codes: int, width: int | None = None) -> torch.Tensor:
        """-> [len(positions), width or codes] noise; columns past `codes` (an index space with extra
        entries, such as SJD's "placed token") are 1."""
        return self.races([(seed, position) for position in positions], codes, width)

    def races(self, keys, codes: int, width: int | None = None) -> torch.Tensor:
        """`race` for rows of different images: keys are (seed, position) pairs."""
        out = torch.ones(len(keys), width or codes, device=self.device)
        for i, (seed, position) in enumerate(keys):
            self._generator.manual_seed(position_key(seed, int(position)))
            out[i, :codes] = exponential_noise((codes,), self._generator, self.device)
        return out


def coupled_draw(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs [K, V], noise [K, V] -> one index per row: argmax p / E (a one-hot row gives its index)."""
    return probs.div(noise.to(probs.device)).argmax(-1)


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
    prompt (its first token) and forwards that feed one token. vLLM's sampler still draws for these
    rows (`worker.py`), so a seeded request's generator advances as it would uncoupled."""

    def __init__(self, device):
        self.noise = PositionNoise(device)
        self.seeds = ImageSeeds()

    @staticmethod
    def plan(step, row):
        from vllm_visual_ar.samplers.strategy import RowPlan

        start, end = step.fed(row)
        return RowPlan([end - start - 1])

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
                   layout.code_ids.start)
            groups.setdefault(key, []).append((row, position))
        for (temperature, top_k, top_p, codes, first_id), members in groups.items():
            last = torch.tensor([at[row].stop - 1 for row, _ in members], device=logits.device)
            p = target_probs(logits[last], temperature, top_k, top_p)
            race = self.noise.races([(self.seed(step, row), position) for row, position in members], codes)
            drawn = coupled_draw(p, race).tolist()
            out.update((row, [first_id + d]) for (row, _), d in zip(members, drawn))
        return out
