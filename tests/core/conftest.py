"""Small float64 models and helpers shared by the core tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn


class TinyLM(nn.Module):
    """Embedding -> Linear on (B, L, d) -> tanh -> Linear to (B, L, V) logits."""

    def __init__(self, vocab: int = 7, width: int = 4, hidden: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


class TinyCNN(nn.Module):
    """Two Conv2d layers (a padding mode each) and a Linear classifier."""

    def __init__(self, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode)
        self.conv2 = nn.Conv2d(3, 4, 2, stride=2, padding="valid", bias=False)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def mlp(inputs: int = 6, hidden: int = 5, classes: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inputs, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, classes))


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path / "log"


@pytest.fixture(autouse=True)
def _float64_and_seed() -> Iterator[None]:
    """Exactness tests run in float64; the default dtype is restored for other test packages."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
