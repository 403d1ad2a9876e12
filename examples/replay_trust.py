"""How far to trust the scores of a run: record it, compute the fast scores, replay it exactly, compare.

Run:  python examples/replay_trust.py   (about a minute on a laptop CPU)

The same replay from the command line, with this file's ``replay_spec`` as the entry point (run it where you ran
the example, with examples/ on PYTHONPATH):
    dvemb replay runs/replay --entry replay_trust:replay_spec --out runs/replay-results --query-set validation
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import dvemb
from dvemb.engine import compute
from dvemb.replay import (
    ReplayArguments,
    ReplaySpec,
    load_initial,
    replay,
    save_initial,
    save_replay,
    schedule_from_log,
    trust,
)

digits = load_digits()
x, y = torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)
train, val = slice(0, 512), slice(1400, 1464)


def make_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)


def loss_fn(forward, batch):  # per-example losses at the replayed weights
    return F.cross_entropy(forward(batch[0]), batch[1], reduction="none")


def replay_spec(log_dir: Path) -> ReplaySpec:
    """What a replay needs: the model and optimizer as they were before the first step, the loss, the data by id."""
    model, optimizer = make_model()
    load_initial(model, optimizer, "runs/replay-initial")
    return ReplaySpec(model, optimizer, loss_fn, lambda ids: (x[ids], y[ids]), [(x[val], y[val])])


if __name__ == "__main__":
    torch.manual_seed(0)
    model, optimizer = make_model()
    save_initial(model, optimizer, "runs/replay-initial")  # one line before training: the run's starting point
    rec = dvemb.Recorder(model, "runs/replay", overwrite=True)
    for _ in range(2):
        order = torch.randperm(512)
        for start in range(0, 512, 32):
            ids = order[start : start + 32]
            with rec.step(ids, optimizer):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
                optimizer.step()
                optimizer.zero_grad()
    rec.record_queries("validation", [(x[val], y[val])])
    rec.close()

    compute("runs/replay", "runs/replay-results", overwrite=True)  # the fast scores
    spec = replay_spec(Path("runs/replay"))
    exact = replay(
        spec.model,
        spec.optimizer,
        schedule_from_log("runs/replay"),
        spec.loss_fn,
        spec.examples,
        spec.queries,
        ReplayArguments(probe=4),
        query_set="validation",
    )
    save_replay(exact, "runs/replay-results")
    record = trust("runs/replay-results", "validation")  # writes trust-validation.json next to the results
    agreement = record["all"]
    print(
        f"fast scores vs exact replay: Spearman {agreement['spearman']:.2f}, top-{agreement['top_k']} helpful overlap "
        f"{agreement['top_helpful_overlap']:.0%}, harmful {agreement['top_harmful_overlap']:.0%}; "
        f"first-order predictable: {record['first_order_predictable']}"
    )
