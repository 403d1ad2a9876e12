"""Replay bundles (dvemb/replay/bundle.py): a run's starting point, data and loss in one safetensors file that a
worker replays without the user's code. A bundle replays to the same scores as the user's own replay (to round-off);
bundles that do not hold together are refused with the problem named."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import dvemb
from dvemb.errors import ConfigError
from dvemb.replay import ReplayArguments, replay, schedule_from_log
from dvemb.replay.bundle import check_bundle, open_bundle, read_spec, write_bundle


def _model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()


def _groups(model: nn.Module) -> list[dict[str, Any]]:
    # Two groups in an order unlike model.parameters(): the optimizer's numbering is not the model's.
    params = list(model.parameters())
    return [{"params": params[2:], "weight_decay": 0.0}, {"params": params[:2], "weight_decay": 0.05}]


def _run(tmp: Path, ids: list[Any]) -> tuple[Path, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A recorded AdamW run in two parameter groups, and its bundle written before training."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    val = (torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (7,), generator=g))
    model = _model()
    optimizer = torch.optim.AdamW(_groups(model), lr=0.02)
    write_bundle(
        tmp / "log" / "replay-bundle.safetensors",
        model=model,
        optimizer=optimizer,
        ids=ids,
        examples={"inputs": x, "labels": y},
        query_sets={"val": {"inputs": val[0], "labels": val[1]}},
    )
    rec = dvemb.Recorder(model, tmp / "log", dtype="float64")
    position = {i: p for p, i in enumerate(ids)}
    for epoch in range(2):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(epoch))
        for start in range(0, 24, 6):
            rows = order[start : start + 6]
            with rec.step([ids[int(r)] for r in rows], optimizer):
                F.cross_entropy(model(x[rows]), y[rows]).backward()
                optimizer.step()
                optimizer.zero_grad()
    rec.close()
    assert [position[i] for i in ids] == list(range(24))
    return tmp / "log", x, y, val


@pytest.mark.parametrize("ids", [list(range(100, 124)), [f"doc-{i}" for i in range(24)]])
def test_a_bundle_replays_bit_for_bit_as_the_users_own_replay(tmp_path: Path, ids: list[Any]) -> None:
    log, x, y, val = _run(tmp_path, ids)
    position = {str(i): p for p, i in enumerate(ids)}

    model = _model()
    optimizer = torch.optim.AdamW(_groups(model), lr=0.02)
    own = replay(
        model,
        optimizer,
        schedule_from_log(log),
        lambda forward, b: F.cross_entropy(forward(b[0]), b[1], reduction="none"),
        lambda batch_ids: (x[[position[str(i)] for i in batch_ids]], y[[position[str(i)] for i in batch_ids]]),
        [val],
        ReplayArguments(),
        query_set="val",
    )
    built = open_bundle(log / "replay-bundle.safetensors")
    assert set(built.query_sets) == {"val"} and built.autocast is None and built.micro_batches == 1
    rebuilt = replay(
        built.model,
        built.optimizer,
        schedule_from_log(log),
        built.loss_fn,
        built.examples,
        built.query_sets["val"],
        ReplayArguments(),
        query_set="val",
    )
    assert rebuilt.scores.shape == own.scores.shape == (48, 1)
    # The same numbers to round-off (the batches are gathered by another indexing path).
    assert abs(rebuilt.scores - own.scores).max() <= 1e-12 * abs(own.scores).max()
    assert abs(own.scores).max() > 1e-3
    assert check_bundle(log / "replay-bundle.safetensors")["query_sets"] == {"val": 7}


def test_a_bundle_keeps_the_optimizers_state_and_tied_weights(tmp_path: Path) -> None:
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 4, bias=False)).double()
    tied[2].weight = tied[0].weight
    optimizer = torch.optim.Adam(tied.parameters(), lr=0.1)
    tied(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    optimizer.step()  # a run resumed from a checkpoint: the state holds moments and a step count
    path = write_bundle(
        tmp_path / "b.safetensors",
        model=tied,
        optimizer=optimizer,
        ids=[0, 1],
        examples={"inputs": torch.zeros(2, 4, dtype=torch.float64), "labels": torch.zeros(2, dtype=torch.int64)},
        query_sets={
            "q": {"inputs": torch.zeros(1, 4, dtype=torch.float64), "labels": torch.zeros(1, dtype=torch.int64)}
        },
    )
    _, shapes = read_spec(path)
    assert [n for n in shapes if n.startswith("model.")] == ["model.0.weight"]  # the tied weight once
    built = open_bundle(path)
    assert built.model[2].weight is built.model[0].weight
    assert torch.equal(built.model[0].weight, tied[0].weight)
    state = built.optimizer.state_dict()["state"][0]
    assert torch.equal(state["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
    assert float(state["step"]) == 1.0


def _bundle_with(tmp: Path, change: Any) -> Path:
    """A valid bundle's header rewritten by ``change(spec, tensors)``."""
    model = _model()
    source = write_bundle(
        tmp / "ok.safetensors",
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        ids=[0, 1, 2],
        examples={"inputs": torch.zeros(3, 5, dtype=torch.float64), "labels": torch.zeros(3, dtype=torch.int64)},
        query_sets={
            "val": {"inputs": torch.zeros(2, 5, dtype=torch.float64), "labels": torch.zeros(2, dtype=torch.int64)}
        },
    )
    from safetensors import safe_open

    with safe_open(str(source), framework="pt") as handle:
        spec = json.loads(handle.metadata()["dvemb-replay-bundle"])
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    change(spec, tensors)
    path = tmp / "changed.safetensors"
    save_file(tensors, str(path), metadata={"dvemb-replay-bundle": json.dumps(spec)})
    return path


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s, t: s.update(format="other"), "not a dvemb-replay-bundle"),
        (lambda s, t: s["model"]["layers"].append({"type": "conv2d"}), "layer type 'conv2d'"),
        (lambda s, t: s["model"].update(kind="pickle"), "model kind 'pickle'"),
        (lambda s, t: s["model"]["layers"][0].update(out_features=7), "do not fit"),
        (lambda s, t: s.update(ids=[0, 1, 1]), "example ids repeat"),
        (lambda s, t: s.update(ids=[0, 1]), "has shape [3, 5]; its table has 2 rows"),
        (lambda s, t: t.update({"evil.x": torch.zeros(1)}), "in no known section"),
        (lambda s, t: t.pop("queries.val.labels"), "needs 'labels'"),
        (lambda s, t: s["optimizer"].update({"class": "LBFGS"}), "optimizer must be one of"),
        (lambda s, t: s["optimizer"]["param_names"][0].append("nope"), "names parameters the model has not"),
        (lambda s, t: s["loss"].update(kind="mse"), "loss kind must be one of"),
        (lambda s, t: s["replay"].update(autocast="int8"), "autocast is null"),
        (lambda s, t: s["query_sets"].update({"../x": 2}), "query set name"),
        (lambda s, t: s["model"].update(dtype="complex64"), "model dtype"),
    ],
)
def test_a_bundle_that_does_not_hold_together_is_refused_with_the_problem_named(
    tmp_path: Path, change: Any, problem: str
) -> None:
    path = _bundle_with(tmp_path, change)
    with pytest.raises(ConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        check_bundle(path)


def test_what_is_not_a_bundle_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(ConfigError, match="not a replay bundle"):
        read_spec(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        read_spec(garbage)
    with pytest.raises(ConfigError, match="cannot be described for the service"):
        write_bundle(
            tmp_path / "x.safetensors",
            model=nn.Sequential(nn.Conv1d(1, 1, 1)),
            optimizer=torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1),
            ids=[0],
            examples={"inputs": torch.zeros(1, 1), "labels": torch.zeros(1)},
            query_sets={"q": {"inputs": torch.zeros(1, 1), "labels": torch.zeros(1)}},
        )


def test_a_layer_outside_the_list_is_refused_before_any_replay(tmp_path: Path) -> None:
    def add_dropout(spec: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        spec["model"]["layers"].insert(1, {"type": "dropout"})

    with pytest.raises(ConfigError, match="layer type 'dropout'"):
        check_bundle(_bundle_with(tmp_path, add_dropout))
