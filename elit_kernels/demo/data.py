"""The demo's data: scikit-learn's bundled 8x8 handwritten digits, upsampled to 16x16, one channel.

Why this data set:

- It needs no download: ``sklearn.datasets.load_digits`` reads a CSV that ships inside scikit-learn
  (1797 images, 10 classes), so the demo runs offline, on CI and on the GPU machine alike.
- It is real data with classes, so class-conditional samples mean something and a held-out split
  measures generalisation, not memorisation of a procedural generator.
- Upsampled (bilinear) to 16x16 with patch 2 it gives the paper's token geometry in miniature: an 8x8
  token grid, 4x4-token windows -> 4 groups of 16 tokens, J_max up to 16 latents per group (K_max = N).
  Procedural shapes would have been as cheap, but their "detail" is whatever the generator draws;
  digits have real coarse-to-fine structure (stroke layout first, stroke shape later) for the
  importance-ordered latents to pick up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGE_SIZE = 16
NUM_CLASSES = 10


@dataclass
class DigitsSplit:
    """Images in [-1, 1] as ``[n, 1, 16, 16]`` float32 and labels ``[n]`` int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_split(test_fraction: float = 0.15, split_seed: int = 0, size: int = IMAGE_SIZE) -> DigitsSplit:
    """Load the bundled digits, scale to [-1, 1], upsample to ``size``, split train/held-out.

    The split depends only on ``split_seed`` (not on the training seed), so every run evaluates on the
    same held-out images.

    >>> d = load_digits_split(); d.train_x.shape[1:], d.test_x.shape[0] > 200
    (torch.Size([1, 16, 16]), True)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a demo-only dependency
        raise ImportError("elit-demo needs scikit-learn for its bundled digits data set: pip install scikit-learn") from e
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction!r}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0  # [n, 1, 8, 8]
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.as_tensor(d.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(split_seed))
    n_test = int(round(test_fraction * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    return DigitsSplit(x[train].contiguous(), y[train].contiguous(), x[test].contiguous(), y[test].contiguous())
