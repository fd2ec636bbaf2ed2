"""Shared fixtures: a tiny CNN backbone so that most tests run in seconds on a CPU."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


class TinyNet(nn.Module):
    """Two scales (strides 2 and 4), like a miniature ResNet trunk."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.block1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        return self.block2(self.block1(self.stem(x)))


@pytest.fixture
def tiny_extractor():
    from skpadim import TorchvisionExtractor

    return TorchvisionExtractor(
        TinyNet(), layers=("block1", "block2"), weights=None, image_size=32, device="cpu"
    )


def textured_images(n, size=32, seed=0):
    """Smooth random uint8 images (n, size, size, 3): normal-looking, cheap, varied."""
    rng = np.random.RandomState(seed)
    base = np.sin(np.linspace(0, 6 * np.pi, size))[None, :, None] * 60 + 128
    noise = rng.randn(n, size, size, 1) * 12
    imgs = base[..., None] + noise + rng.randn(n, 1, 1, 1) * 5
    return np.clip(np.repeat(imgs, 3, axis=-1), 0, 255).astype(np.uint8)


@pytest.fixture
def normal_images():
    return textured_images(24, seed=0)


@pytest.fixture
def test_images():
    X = textured_images(8, seed=1)
    X[4:, 10:18, 10:18] = 255  # a bright square defect on the last four
    return X
