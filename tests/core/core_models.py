"""Small float64-ready models shared by the core tests."""

from __future__ import annotations

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


class TiedLM(nn.Module):
    """GPT-2's layout in small: the LM head shares the embedding's weight (V, d)."""

    def __init__(self, vocab: int = 9, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width, padding_idx=0)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

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
