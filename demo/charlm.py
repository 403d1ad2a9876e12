"""A small character-level transformer language model trained with a warmup-then-cosine schedule on
text that is on every machine: the Python standard library's own source, read at run time."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import dvemb

MODULES = (
    "textwrap.py",
    "string.py",
    "shlex.py",
    "fnmatch.py",
    "glob.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
    "keyword.py",
    "calendar.py",
    "difflib.py",
    "pprint.py",
    "queue.py",
    "sched.py",
    "statistics.py",
)


def corpus(max_chars: int) -> str:
    """Up to ``max_chars`` of standard-library source, module after module."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts = [(stdlib / name).read_text(encoding="utf-8") for name in MODULES if (stdlib / name).exists()]
    return "\n".join(parts)[:max_chars]


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(width, dim=2)  # (B, L, W) each
        q, k, v = (t.view(b, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, W/H)
        x = x + self.out(attended.transpose(1, 2).reshape(b, length, width))
        out: torch.Tensor = x + self.down(F.gelu(self.up(self.norm2(x))))
        return out


class CharLM(nn.Module):
    def __init__(self, vocab: int, width: int = 64, layers: int = 2, heads: int = 4, length: int = 64) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Parameter(torch.zeros(length, width))
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]  # (B, L, W)
        logits: torch.Tensor = self.head(self.norm(self.blocks(x)))  # (B, L, V)
        return logits


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_charlm(log_dir: Path, *, quick: bool, seed: int = 0) -> Path:
    """Train with the recorder (empirical curvature, the paper's); held-out text is the query set."""
    torch.manual_seed(seed)
    text = corpus(60_000 if quick else 300_000)
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train, held_out = data[:split], data[split:]
    length, batch = 64, 16
    steps = 120 if quick else 600
    model = CharLM(len(vocab), length=length)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, max(1, steps // 10)))
    rec = dvemb.Recorder(model, log_dir, proj_dim=64, overwrite=True)
    starts = torch.arange(0, len(train) - length - 1, length)  # one example = one window of text
    generator = torch.Generator().manual_seed(seed)
    windows = [train[s : s + length + 1] for s in starts.tolist()]
    rec.describe(
        list(range(len(windows))),
        texts=["".join(vocab[i] for i in w[:length].tolist()) for w in windows],
        sources=["python stdlib"] * len(windows),
    )
    calibration = [torch.stack(windows[i : i + batch]) for i in range(0, 8 * batch, batch)]
    rec.calibrate((w[:, :-1], w[:, 1:]) for w in calibration)  # curvature-aware bases (docs/recorder.md)
    for _step in range(steps):
        ids = torch.randperm(len(windows), generator=generator)[:batch]  # distinct examples within a step
        chunk = torch.stack([windows[i] for i in ids.tolist()])  # (B, L + 1)
        with rec.step(ids, optimizer):
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            loss.backward()
            rec.log_loss(loss)
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
    queries = torch.stack([held_out[s : s + length + 1] for s in range(0, 32 * length, length)])  # (32, L + 1)
    texts = ["".join(vocab[i] for i in q[:length].tolist()) for q in queries]
    rec.record_queries(
        "held-out-text", [(queries[:, :-1], queries[:, 1:], [f"held-out-{i}" for i in range(32)])], texts=texts
    )
    rec.close()
    return log_dir
