"""Exact replay (dvemb.replay) against a naive full-dimensional reference, finite differences of real
retraining with torch.optim, and the trust measure on a predictable and an unpredictable run."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import dvemb
from dvemb.engine import ComputeArguments, compute, load_results
from dvemb.replay import (
    ReplayArguments,
    Replayer,
    ReplayError,
    ReplaySchedule,
    describe,
    load_initial,
    load_replay,
    replay,
    save_initial,
    save_replay,
    schedule_from_log,
    trust,
)

N, BATCH, STEPS_PER_EPOCH, EPOCHS = 12, 4, 3, 2
T = STEPS_PER_EPOCH * EPOCHS
LRS = [0.05 * (1 - 0.05 * t) for t in range(16)]  # a decaying schedule
OPTIMIZERS: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd-decay": lambda p: torch.optim.SGD(p, lr=LRS[0], weight_decay=0.01),
    "momentum-dampening": lambda p: torch.optim.SGD(p, lr=LRS[0], momentum=0.9, dampening=0.2, weight_decay=0.01),
    "nesterov": lambda p: torch.optim.SGD(p, lr=LRS[0], momentum=0.8, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=LRS[0], betas=(0.8, 0.9), weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=LRS[0], betas=(0.8, 0.9), weight_decay=0.1),
}


def _data(seed: int = 0, n: int = N, d: int = 3, classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


def _order(n: int = N, batch: int = BATCH, epochs: int = EPOCHS, seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g).tolist()
        out += [perm[i : i + batch] for i in range(0, n - batch + 1, batch)]
    return out


def _mlp(seed: int = 0, d: int = 3, hidden: int = 4, classes: int = 2, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, hidden), act(), nn.Linear(hidden, classes)).double()


def _loss_fn(forward: Callable[..., torch.Tensor], batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(forward(batch[0]), batch[1], reduction="none")


# -- the naive reference: the optimizer written from PyTorch's documented algorithms, over one flat state vector,
# -- every step's full Jacobian, every removal pushed forward step by step.


class Naive:
    """Training as a map of the flat state ``s = (theta, buf)`` (SGD with momentum) or ``(theta, m, v)`` (Adam)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
        self.model, self.x, self.y = model, x, y
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.P = sum(p.numel() for p in model.parameters())
        group = optimizer.param_groups[0]
        self.kind = type(optimizer).__name__
        self.h = dict(group)
        self.slots = 0 if self.kind == "SGD" and group["momentum"] == 0 else 1 if self.kind == "SGD" else 2
        theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        self.initial = torch.cat([theta, torch.zeros(self.slots * self.P)])

    def loss(self, theta: torch.Tensor, ids: list[int], w: torch.Tensor) -> torch.Tensor:
        params, i = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        out = functional_call(self.model, params, (self.x[ids],))
        return (w * F.cross_entropy(out, self.y[ids], reduction="none")).sum() / len(ids)

    def step(self, s: torch.Tensor, w: torch.Tensor, ids: list[int], t: int) -> torch.Tensor:
        """PyTorch's update at step t (0-based), written as in its documentation."""
        P, h, lr = self.P, self.h, LRS[t]
        s = s if s.requires_grad else s.detach().requires_grad_(True)
        theta = s[:P]
        g = torch.autograd.grad(self.loss(theta, ids, w), theta, create_graph=True)[0]
        if self.kind == "SGD":
            g = g + h["weight_decay"] * theta
            if self.slots == 0:
                return theta - lr * g
            b = g if t == 0 else h["momentum"] * s[P:] + (1 - h["dampening"]) * g
            step = g + h["momentum"] * b if h["nesterov"] else b
            return torch.cat([theta - lr * step, b])
        b1, b2 = h["betas"]
        if self.kind == "AdamW":
            theta = theta * (1 - lr * h["weight_decay"])
        else:
            g = g + h["weight_decay"] * theta
        m = b1 * s[P : 2 * P] + (1 - b1) * g
        v = b2 * s[2 * P :] + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        return torch.cat([theta - lr * m_hat / (v_hat.sqrt() + h["eps"]), m, v])

    def trajectory(self, order: list[list[int]]) -> list[torch.Tensor]:
        states = [self.initial]
        for t, ids in enumerate(order):
            s = states[-1].detach().requires_grad_(True)
            states.append(self.step(s, torch.ones(len(ids)), ids, t).detach())
        return states

    def scores(self, order: list[list[int]], query: tuple[torch.Tensor, torch.Tensor], removal: str) -> np.ndarray:
        """(R,) the query loss change, to first order, when each occurrence is removed: pushed forward."""
        states = self.trajectory(order)
        jac = [
            torch.autograd.functional.jacobian(
                lambda s, t=t, ids=ids: self.step(s, torch.ones(len(ids)), ids, t), states[t]
            )
            for t, ids in enumerate(order)
        ]  # (D, D) each
        q = self.query_grad(states[-1][: self.P], query)
        out = []
        for t, ids in enumerate(order):
            B = len(ids)
            dstep = torch.autograd.functional.jacobian(
                lambda w, t=t, ids=ids: self.step(states[t], w, ids, t), torch.ones(B)
            )
            for p in range(B):
                dw = torch.zeros(B)
                dw[p] = -1.0
                if removal == "batch":
                    dw += (torch.arange(B) != p).double() / (B - 1)
                ds = dstep @ dw  # (D,) the state change after step t
                for k in range(t + 1, len(order)):
                    ds = jac[k] @ ds
                out.append(float(q @ ds[: self.P]))
        return np.array(out)

    def query_grad(self, theta: torch.Tensor, query: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        theta = theta.detach().requires_grad_(True)
        params, i = {}, 0
        for name, shape in zip(self.names, self.shapes, strict=True):
            params[name] = theta[i : i + shape.numel()].view(shape)
            i += shape.numel()
        loss = F.cross_entropy(functional_call(self.model, params, (query[0],)), query[1])
        return torch.autograd.grad(loss, theta)[0]


def _train_torch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    order: list[list[int]],
    micro: int = 1,
) -> None:
    """Real training with torch.optim (gradient accumulation over ``micro`` equal parts, loss / micro)."""
    for t, ids in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = LRS[t]
        size = len(ids) // micro
        for i in range(micro):
            part = ids[i * size : (i + 1) * size]
            (F.cross_entropy(model(x[part]), y[part]) / micro).backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("removal", ["weight", "batch"])
def test_replay_equals_the_naive_pushed_forward_reference(name: str, removal: str) -> None:
    x, y = _data()
    order = _order()
    model = _mlp()
    init, init_opt = copy.deepcopy(model), None
    optimizer = OPTIMIZERS[name](model.parameters())
    init_opt = OPTIMIZERS[name](init.parameters())
    naive = Naive(copy.deepcopy(init), init_opt, x, y)
    _train_torch(model, optimizer, x, y, order, micro=2)
    # The reference follows PyTorch's own training (anchors both implementations to torch.optim).
    final = naive.trajectory(order)[-1][: naive.P]
    torch.testing.assert_close(
        final, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), rtol=0, atol=1e-12
    )

    query = (x[:5], y[:5])
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")
    result = replay(
        init,
        init_opt,
        schedule,
        _loss_fn,
        lambda ids: (x[ids], y[ids]),
        [query],
        ReplayArguments(removal=removal, checkpoint_every=4, micro_batches=2),
    )
    expected = naive.scores(order, query, removal)
    assert result.scores.shape == (T * BATCH, 1)
    assert np.abs(expected).max() > 1e-3  # not a test of zeros
    np.testing.assert_allclose(result.scores[:, 0], expected, rtol=0, atol=1e-10)
    assert result.summary["loss_gap"] is None and result.summary["removal"] == removal


def test_every_checkpoint_spacing_gives_the_same_scores() -> None:
    x, y = _data()
    order = _order()
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")
    runs = []
    for every in (1, 2, 5, None, 100):
        model = _mlp()
        opt = OPTIMIZERS["adamw"](model.parameters())
        runs.append(
            replay(
                model,
                opt,
                schedule,
                _loss_fn,
                lambda ids: (x[ids], y[ids]),
                [(x, y)],
                ReplayArguments(checkpoint_every=every),
            ).scores
        )
    for other in runs[1:]:
        np.testing.assert_allclose(other, runs[0], rtol=0, atol=1e-14)


def test_replay_agrees_with_central_differences_of_real_retraining() -> None:
    """d J / d w_z by retraining with torch.optim, the occurrence's loss weighted 1 +- 1e-4 (tanh MLP, two epochs)."""
    x, y = _data(seed=3, n=16, d=4, classes=3)
    order = _order(n=16, batch=4, seed=5)
    query = (x[:6], y[:6])
    for name in ("nesterov", "adamw"):
        init = _mlp(seed=2, d=4, hidden=5, classes=3)
        schedule = ReplaySchedule(order, [[lr] for lr in LRS[: len(order)]], "mean")
        start = copy.deepcopy(init)
        result = replay(
            start,
            OPTIMIZERS[name](start.parameters()),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [query],
            ReplayArguments(removal="weight"),
        )

        def retrained(t: int, p: int, w: float, name: str = name, init: nn.Module = init) -> float:
            model = copy.deepcopy(init)
            opt = OPTIMIZERS[name](model.parameters())
            for k, ids in enumerate(order):
                for group in opt.param_groups:
                    group["lr"] = LRS[k]
                weights = torch.ones(len(ids))
                if k == t:
                    weights[p] = w
                (weights * F.cross_entropy(model(x[ids]), y[ids], reduction="none")).mean().backward()
                opt.step()
                opt.zero_grad()
            with torch.no_grad():
                return float(F.cross_entropy(model(query[0]), query[1]))

        # Central differences at 1e-6: at Adam's first step (v_hat = g^2, the update ~ sign(g)) the map is so
        # steep that differences at 1e-4 are already 1% off the derivative.
        eps = 1e-6
        base = retrained(-1, 0, 1.0)
        for t, p in [(0, 1), (2, 3), (4, 0), (len(order) - 1, 2)]:
            derivative = (retrained(t, p, 1 + eps) - retrained(t, p, 1 - eps)) / (2 * eps)
            score = result.scores[t * 4 + p, 0]
            assert abs(score) > 1e-4
            # The score is the loss change when the occurrence's weight goes 1 -> 0: -dJ/dw to first order.
            assert score == pytest.approx(-derivative, rel=1e-5)
            if name == "nesterov":  # a removal of weight 1e-4 (one-sided), to first-order accuracy
                assert score == pytest.approx((retrained(t, p, 1 - 1e-4) - base) / 1e-4, rel=1e-3)


def test_replay_refuses_what_it_cannot_replay() -> None:
    x, y = _data()
    order = _order()
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1), nn.Linear(4, 2))
    with pytest.raises(ReplayError, match="dropout"):
        Replayer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x, y)],
        )
    sharded = type("FullyShardedDataParallel", (nn.Sequential,), {})(nn.Linear(3, 2))
    with pytest.raises(ReplayError, match="FSDP"):
        Replayer(
            sharded,
            torch.optim.SGD(sharded.parameters(), lr=0.1),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x, y)],
        )
    model = _mlp()
    with pytest.raises(dvemb.ConfigError, match="amsgrad"):
        Replayer(
            model,
            torch.optim.Adam(model.parameters(), amsgrad=True),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x, y)],
        )
    with pytest.raises(dvemb.ConfigError, match="RMSprop"):
        Replayer(
            model, torch.optim.RMSprop(model.parameters()), schedule, _loss_fn, lambda ids: (x[ids], y[ids]), [(x, y)]
        )
    mean_loss = lambda forward, batch: F.cross_entropy(forward(batch[0]), batch[1])  # noqa: E731
    with pytest.raises(ReplayError, match="one loss per example"):
        replay(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            schedule,
            mean_loss,
            lambda ids: (x[ids], y[ids]),
            [(x, y)],
        )


def _recorded_run(tmp: Path, act: type[nn.Module], lr: float) -> tuple[Path, Callable[[ReplayArguments], Any]]:
    """A small MLP trained by SGD for two epochs and recorded (unprojected); computed into ``tmp / "out"``."""
    g = torch.Generator().manual_seed(0)
    n = 64
    x = torch.randn(n + 32, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g) + 0.5 * torch.randn(n + 32, 3, generator=g)).argmax(1)
    (xt, yt), (x, y) = (x[n:], y[n:]), (x[:n], y[:n])
    model = _mlp(seed=0, d=8, hidden=16, classes=3, act=act)
    init = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    rec = dvemb.Recorder(model, tmp / "log", proj_dim=None, dtype="float64", loss_reduction="mean")
    for _ in range(2):
        perm = torch.randperm(n, generator=g).tolist()
        for i in range(0, n, 8):
            ids = perm[i : i + 8]
            with rec.step(ids, optimizer):
                F.cross_entropy(model(x[ids]), y[ids]).backward()
                optimizer.step()
                optimizer.zero_grad()
    rec.record_queries("test", [(xt, yt, list(range(len(xt))))])
    rec.close()
    compute(tmp / "log", tmp / "out", ComputeArguments(accumulate_dtype="float64"))

    def run(arguments: ReplayArguments) -> Any:
        start = copy.deepcopy(init)
        return replay(
            start,
            torch.optim.SGD(start.parameters(), lr=lr),
            schedule_from_log(tmp / "log"),
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(xt, yt)],
            arguments,
            query_set="test",
        )

    return tmp / "out", run


@pytest.mark.parametrize(("act", "lr", "predictable"), [(nn.Tanh, 0.05, True), (nn.ReLU, 1.0, False)])
def test_trust_separates_a_predictable_run_from_an_unpredictable_one(
    tmp_path: Path, act: type[nn.Module], lr: float, predictable: bool
) -> None:
    out, run = _recorded_run(tmp_path, act, lr)
    result = run(ReplayArguments(probe=8))
    results = load_results(out)
    assert result.scores.shape == (results.scores("test").shape[0], 1)
    save_replay(result, out)
    loaded = load_replay(out, "test")
    np.testing.assert_array_equal(loaded.scores, result.scores)
    record = trust(out, "test")
    assert json.loads((out / "trust-test.json").read_text()) == record
    assert record["removal"] == "batch" == result.removal  # a mean-reduced log: the example leaves its batch
    assert set(record["phases"]) == {"early", "basin", "late"}
    assert sum(p["occurrences"] for p in record["phases"].values()) == record["all"]["occurrences"] == 128
    probe = record["probe"]
    assert probe["occurrences"] == 8
    assert record["first_order_predictable"] is predictable
    assert record["first_order_verdict"] == ("predictable" if predictable else "not predictable")
    line = describe(record)
    assert line.startswith(f"fast scores agree with exact replay: Spearman {record['all']['spearman']:.2f}, top-64")
    assert ("WARNING" in line) is not predictable
    if predictable:  # removal scaled 0.5x, 1x, 2x answers in proportion, as the replay predicts
        assert probe["proportionality"] < 0.05 and probe["first_order"] < 0.05
        assert record["all"]["spearman"] > 0.95  # unprojected fast scores agree with the replay
    else:
        assert probe["proportionality"] > 0.5 and probe["first_order"] > 0.25


def test_trust_refuses_a_replay_of_other_occurrences_or_removal(tmp_path: Path) -> None:
    out, run = _recorded_run(tmp_path, nn.Tanh, 0.05)
    weight = run(ReplayArguments(removal="weight"))
    save_replay(weight, out)
    batch_from_weight = trust(out, "test", write=False)  # weight scores are centred per step: same as a batch replay
    save_replay(run(ReplayArguments(removal="batch")), out)
    assert trust(out, "test", write=False)["all"] == pytest.approx(batch_from_weight["all"], rel=1e-12)
    assert batch_from_weight["first_order_predictable"] is None  # no probe was run
    weight.summary["rows_digest"] = "0" * 64
    save_replay(weight, out)
    with pytest.raises(dvemb.ConfigError, match="other occurrences"):
        trust(out, "test")
    with pytest.raises(dvemb.ConfigError, match="no replay"):
        trust(out, "other")


ENTRY = """
import torch, torch.nn.functional as F
from torch import nn
from dvemb.replay import ReplaySpec

def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, dtype=torch.float64, generator=g)
    return x, (x[:, 0] > 0).long(), g

def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()

def loss_fn(forward, batch):
    return F.cross_entropy(forward(batch[0]), batch[1], reduction="none")

def spec(log_dir):
    x, y, _ = data()
    m = model()
    return ReplaySpec(m, torch.optim.Adam(m.parameters(), lr=0.01), loss_fn, lambda ids: (x[ids], y[ids]),
                      [(x[32:], y[32:])])
"""


def test_replay_command_runs_a_users_entry_point_and_reports_trust(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "replay_entry_for_test.py").write_text(ENTRY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    import replay_entry_for_test as entry

    x, y, g = entry.data()
    model = entry.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    rec = dvemb.Recorder(model, tmp_path / "log", proj_dim=None, dtype="float64")
    for _ in range(2):
        perm = torch.randperm(32, generator=g).tolist()
        for i in range(0, 32, 8):
            with rec.step(perm[i : i + 8], optimizer):
                F.cross_entropy(model(x[perm[i : i + 8]]), y[perm[i : i + 8]]).backward()
                optimizer.step()
                optimizer.zero_grad()
    rec.record_queries("test", [(x[32:], y[32:], list(range(8)))])
    rec.close()
    compute(tmp_path / "log", tmp_path / "out", ComputeArguments(accumulate_dtype="float64"))
    from dvemb.cli import main

    argv = ["replay", "log", "--entry", "replay_entry_for_test:spec", "--out", "out", "--query-set", "test"]
    assert main([*argv, "--probe", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["optimizer"] == ["adam"] and report["steps"] == 8 and report["occurrences"] == 64
    assert report["trust"]["all"]["spearman"] > 0.5  # an unprojected Adam run: the fast scores follow the replay
    assert report["probe"]["occurrences"] == 2
    assert (tmp_path / "out" / "trust-test.json").exists()
    assert main(["trust", "out", "--query-set", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["all"] == report["trust"]["all"]
    assert main([*argv[:3], "replay_entry_for_test:nothing", *argv[4:]]) == 2
    assert "has no function 'nothing'" in capsys.readouterr().err


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_query_columns_batched_equal_one_replay_per_query(micro_batches: int) -> None:
    """K columns pulled back together (a vmap over the backward pass) equal K replays of one column each."""
    x, y = _data()
    order = _order()
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")

    def run(queries: list[Any], columns: str) -> tuple[np.ndarray, Replayer]:
        model = _mlp()
        replayer = Replayer(
            model,
            OPTIMIZERS["adamw"](model.parameters()),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            queries,
            ReplayArguments(query_columns=columns, checkpoint_every=2, micro_batches=micro_batches),
        )
        return replayer.adjoint()[0].numpy(), replayer

    together, replayer = run([(x[:2], y[:2]), (x[2:3], y[2:3])], "each")
    assert replayer.pull.batched  # the batched path ran (no fallback to one query at a time)
    assert together.shape == (T * BATCH, 3)
    for k in range(3):
        alone, _ = run([(x[k : k + 1], y[k : k + 1])], "mean")
        np.testing.assert_allclose(together[:, k], alone[:, 0], rtol=0, atol=1e-13)
    mean, _ = run([(x[:3], y[:3])], "mean")
    np.testing.assert_allclose(together.mean(1), mean[:, 0], rtol=0, atol=1e-13)


class Killed(Exception):
    """Stands for the process being killed mid-way."""


@pytest.mark.parametrize("kill_at", [5, 11])  # in the forward pass; in the adjoint, after its first segment
def test_a_replay_killed_mid_way_resumes_from_its_work_directory(tmp_path: Path, kill_at: int) -> None:
    x, y = _data()
    order = _order()
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")
    calls = []

    def examples(ids: list[int], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        if limit is not None and len(calls) > limit:
            raise Killed
        return x[ids], y[ids]

    def run(limit: int | None, work: Path | None) -> Any:
        model = _mlp()
        return replay(
            model,
            OPTIMIZERS["adam"](model.parameters()),
            schedule,
            _loss_fn,
            lambda ids: examples(ids, limit),
            [(x, y)],
            ReplayArguments(checkpoint_every=2, probe=1),
            work_dir=work,
        )

    uninterrupted = run(None, None)
    full_calls = len(calls)
    calls.clear()
    with pytest.raises(Killed):
        run(kill_at, tmp_path / "work")
    calls.clear()
    resumed = run(None, tmp_path / "work")
    assert len(calls) < full_calls  # it did not start over
    np.testing.assert_array_equal(resumed.scores, uninterrupted.scores)
    assert resumed.summary["probe"]["records"] == uninterrupted.summary["probe"]["records"]
    model = _mlp()
    with pytest.raises(dvemb.ConfigError, match="another replay"):  # other options: the directory is refused
        replay(
            model,
            OPTIMIZERS["adam"](model.parameters()),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x, y)],
            ReplayArguments(checkpoint_every=3),
            work_dir=tmp_path / "work",
        )


def test_initial_state_kept_before_training_is_replayed_from_a_fresh_model(tmp_path: Path) -> None:
    x, y = _data()
    order = _order()
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[:T]], "mean")
    model = _mlp()
    optimizer = OPTIMIZERS["adam"](model.parameters())
    F.cross_entropy(model(x), y).backward()  # a run resumed from a checkpoint: Adam has moments and a step count
    optimizer.step()
    optimizer.zero_grad()
    save_initial(model, optimizer, tmp_path / "initial")
    kept = copy.deepcopy(model)
    kept_optimizer = OPTIMIZERS["adam"](kept.parameters())
    kept_optimizer.load_state_dict(optimizer.state_dict())

    def scores(m: nn.Module, o: torch.optim.Optimizer) -> np.ndarray:
        return replay(m, o, schedule, _loss_fn, lambda ids: (x[ids], y[ids]), [(x, y)]).scores

    fresh = _mlp(seed=7)
    fresh_optimizer = OPTIMIZERS["adam"](fresh.parameters())
    load_initial(fresh, fresh_optimizer, tmp_path / "initial")
    assert int(fresh_optimizer.state[next(fresh.parameters())]["step"]) == 1
    np.testing.assert_array_equal(scores(fresh, fresh_optimizer), scores(kept, kept_optimizer))
    other = _mlp()
    with pytest.raises(dvemb.ConfigError, match="AdamW"):
        load_initial(other, OPTIMIZERS["adamw"](other.parameters()), tmp_path / "initial")
    wider = _mlp(hidden=5)
    with pytest.raises(dvemb.ConfigError, match="do not fit"):
        load_initial(wider, OPTIMIZERS["adam"](wider.parameters()), tmp_path / "initial")


def test_options_and_schedules_are_validated_with_the_fix() -> None:
    with pytest.raises(dvemb.ConfigError, match="removal='drop'"):
        ReplayArguments(removal="drop")
    with pytest.raises(dvemb.ConfigError, match="checkpoint_every=0"):
        ReplayArguments(checkpoint_every=0)
    with pytest.raises(dvemb.ConfigError, match="1.0 among them"):
        ReplayArguments(probe_scales=(0.5, 2.0))
    with pytest.raises(dvemb.ConfigError, match="2 steps of ids but 1 steps of learning rates"):
        ReplaySchedule([[0], [1]], [[0.1]])
    with pytest.raises(dvemb.ConfigError, match="step 1 has no examples"):
        ReplaySchedule([[0], []], [[0.1], [0.1]])
    with pytest.raises(dvemb.ConfigError, match="2 learning rates for an optimizer of 3 groups"):
        ReplaySchedule([[0]], [[0.1, 0.2]]).group_lrs(0, 3)
    x, y = _data()
    model = _mlp()
    with pytest.raises(dvemb.ConfigError, match="more than max_queries=4"):
        replay(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            ReplaySchedule([[0, 1]], [[0.1]]),
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x[:5], y[:5])],
            ReplayArguments(query_columns="each", max_queries=4),
        )


@pytest.mark.parametrize("name", ["sgd-decay", "adamw"])
def test_a_mixed_precision_run_is_replayed_as_trained(name: str) -> None:
    """A run trained in float32 under bfloat16 autocast: the replay with ``autocast="bfloat16"`` follows it bit for
    bit (its final weights equal the trained ones), without it the replay drifts by bfloat16's rounding; the scores
    are finite, and the option is validated."""
    x, y = (t.float() if t.is_floating_point() else t for t in _data(n=24, d=6, classes=3))
    order = _order(n=24, batch=8, epochs=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).float()  # autocast casts float32 only
    initial = copy.deepcopy(model)
    optimizer = OPTIMIZERS[name](model.parameters())
    for t, ids in enumerate(order):
        for group in optimizer.param_groups:
            group["lr"] = LRS[t]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x[ids]), y[ids])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained = torch.cat([p.detach().flatten() for p in model.parameters()])
    schedule = ReplaySchedule(order, [[lr] for lr in LRS[: len(order)]], "mean")

    def replayed(autocast: str | None) -> tuple[torch.Tensor, Any]:
        fresh = copy.deepcopy(initial)
        replayer = Replayer(
            fresh,
            OPTIMIZERS[name](fresh.parameters()),
            schedule,
            _loss_fn,
            lambda ids: (x[ids], y[ids]),
            [(x[:6], y[:6])],
            ReplayArguments(autocast=autocast),
        )
        final = replayer.forward()
        return torch.cat([p.flatten() for p in final.params]), replayer

    as_trained, replayer = replayed("bfloat16")
    in_float32, _ = replayed(None)
    assert torch.equal(as_trained, trained)  # bit for bit: the same operations in the same precision
    assert (in_float32 - trained).abs().max() > 1e-5 * trained.abs().max()  # bfloat16's rounding, left out
    scores, _ = replayer.adjoint()
    assert scores.shape[0] == sum(len(ids) for ids in order)
    assert torch.isfinite(torch.as_tensor(scores)).all()
    with pytest.raises(dvemb.ConfigError, match="bfloat16"):
        ReplayArguments(autocast="bf16")
