"""An MLP on scikit-learn's bundled digits with a few percent of its training labels flipped on purpose.

Influence on the clean test split should single out the flipped examples as harmful.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import dvemb


@dataclass(frozen=True)
class DigitsResult:
    log_dir: Path
    flipped: list[int]  # ids of the training examples whose label was flipped
    train_size: int
    test_accuracy: float


def train_digits(log_dir: Path, *, quick: bool, seed: int = 0, flip_share: float = 0.05) -> DigitsResult:
    """Train the MLP with the recorder (ggn curvature, all classes) and record the clean test split."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = rng.permutation(len(x))
    n_train = 600 if quick else 1300
    train, test = order[:n_train], order[n_train : n_train + (200 if quick else 497)]
    noisy = y[train].clone()
    flipped = rng.choice(n_train, size=int(flip_share * n_train), replace=False)
    for i in flipped:
        noisy[i] = (int(noisy[i]) + int(rng.integers(1, 10))) % 10  # a different class, chosen at random
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, proj_dim=(32, 32), overwrite=True)  # Gauss-Newton curvature by default
    rec.describe(
        list(range(n_train)),
        labels=noisy.tolist(),
        texts=[
            f"label flipped from {int(y[train][i])} to {int(noisy[i])}"
            if i in set(flipped.tolist())
            else f"digit {int(noisy[i])}"
            for i in range(n_train)
        ],
        sources=["sklearn digits"] * n_train,
        images=digits.images[train] / 16.0,
    )
    batch, epochs = 32, 4 if quick else 6
    # Curvature-aware projection bases from a few batches at the start (docs/recorder.md).
    calibration = torch.from_numpy(rng.permutation(n_train)[: 8 * batch]).split(batch)
    total_steps = epochs * (n_train // batch)
    rec.calibrate(
        [(x[train][ids], noisy[ids]) for ids in calibration], optimizer=optimizer, lookahead_steps=total_steps // 10
    )
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(n_train))
        for start in range(0, n_train - batch + 1, batch):
            ids = perm[start : start + batch]
            with rec.step(ids, optimizer):
                loss = F.cross_entropy(model(x[train][ids]), noisy[ids])
                loss.backward()
                rec.log_loss(loss)
                optimizer.step()
                optimizer.zero_grad()
    x_test, y_test = x[test], y[test]
    rec.record_queries("clean-test", [(x_test, y_test, [f"test-{i}" for i in range(len(test))])])
    rec.close()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return DigitsResult(log_dir, sorted(int(i) for i in flipped), n_train, accuracy)
