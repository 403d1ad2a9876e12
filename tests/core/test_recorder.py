"""Recorder behaviour: what it reads from the optimizer, and clear errors for every misuse."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyLM, mlp
from reference import ce_mean_over_positions, layer_matrix, per_example_grads
from torch import nn

import dvemb


def _one_step(rec: dvemb.Recorder, model: nn.Module, optimizer: torch.optim.Optimizer, batch: int = 3) -> None:
    with rec.step(list(range(batch)), optimizer):
        F.cross_entropy(model(torch.randn(batch, 6)), torch.randint(0, 3, (batch,))).backward()
        optimizer.step()
        optimizer.zero_grad()


def test_learning_rate_is_the_one_optimizer_step_used(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.5, "weight_decay": 0.01}, {"params": model[2].parameters()}],
        lr=0.1,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    rec = dvemb.Recorder(model, log_dir)
    for _ in range(3):
        with rec.step([0, 1], optimizer):
            F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
            optimizer.step()
            scheduler.step()  # changes the rate after the update: the recorded rate must not follow it
            optimizer.zero_grad()
    rec.close()
    shard = dvemb.open_log(log_dir).read_shard(0)
    assert shard.lr.tolist() == [[0.5, 0.1], [0.25, 0.05], [0.125, 0.025]]
    assert shard.weight_decay[:, 0].tolist() == [0.01] * 3 and shard.weight_decay[:, 1].tolist() == [0.0] * 3


@pytest.mark.parametrize(
    ("make", "mode", "propagation"),
    [
        (lambda p: torch.optim.Adam(p, lr=1e-3), "l2", "adam"),
        (lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1), "decoupled", "adamw"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "l2", "momentum"),
    ],
)
def test_modelled_optimizers_are_described_without_warning(
    log_dir: Path, make: object, mode: str, propagation: str
) -> None:
    model = mlp()
    optimizer = make(model.parameters())  # type: ignore[operator]
    rec = dvemb.Recorder(model, log_dir)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_step(rec, model, optimizer)
    rec.close()
    described = dvemb.open_log(log_dir).manifest["optimizer"]
    assert described["exact_sgd"] is False and described["weight_decay_mode"] == mode
    assert described["propagation"] == propagation and described["proxy_reason"] is None
    assert described["final_state"]["param_groups"][0]  # momentum / moment summaries recorded


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: torch.optim.RMSprop(p, lr=1e-3), "RMSprop has no optimizer-exact propagation"),
        (lambda p: torch.optim.Adam(p, lr=1e-3, amsgrad=True), "amsgrad"),
        (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize"),
    ],
)
def test_unmodelled_optimizers_warn_once_about_the_proxy(log_dir: Path, make: object, reason: str) -> None:
    model = mlp()
    optimizer = make(model.parameters())  # type: ignore[operator]
    rec = dvemb.Recorder(model, log_dir)
    with pytest.warns(dvemb.DvembWarning, match="SGD proxy"):
        _one_step(rec, model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _one_step(rec, model, optimizer)  # once only
    rec.close()
    described = dvemb.open_log(log_dir).manifest["optimizer"]
    assert described["propagation"] == "proxy" and reason in described["proxy_reason"]


def test_tracked_share_of_parameters(log_dir: Path) -> None:
    model = TinyLM()
    rec = dvemb.Recorder(model, log_dir)  # Linear layers only by default
    linear = sum(p.numel() for m in (model.mix, model.head) for p in m.parameters())
    assert rec.tracked_parameters == linear
    assert rec.tracked_fraction == pytest.approx(linear / sum(p.numel() for p in model.parameters()))
    rec.close()
    assert dvemb.open_log(log_dir).manifest["tracked_parameters"] == linear


def test_wrong_number_of_ids(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir)
    with pytest.raises(dvemb.RecorderError, match="saw 3 examples .* but 2 ids"), rec.step([0, 1], optimizer):
        F.cross_entropy(model(torch.randn(3, 6)), torch.tensor([0, 1, 2])).backward()
        optimizer.step()
    _one_step(rec, model, optimizer)  # a failed step leaves the recorder usable
    rec.close()
    assert dvemb.open_log(log_dir).num_steps == 1


def test_step_without_backward(log_dir: Path) -> None:
    model = mlp()
    rec = dvemb.Recorder(model, log_dir)
    with (
        pytest.raises(dvemb.RecorderError, match=r"call loss\.backward\(\) inside"),
        rec.step([0, 1], torch.optim.SGD(model.parameters(), lr=0.1)),
    ):
        model(torch.randn(2, 6))


def test_exception_in_the_loop_records_nothing(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir)
    with pytest.raises(KeyError), rec.step([0, 1], optimizer):
        F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
        raise KeyError("user code failed")
    _one_step(rec, model, optimizer)
    rec.close()
    assert dvemb.open_log(log_dir).read_shard(0).steps.tolist() == [0]


def test_non_finite_gradient_stops_with_the_step(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir)
    _one_step(rec, model, optimizer)
    with (
        pytest.raises(dvemb.RecorderError, match="non-finite gradient .* at step 1 .*keeps steps 0 to 0"),
        rec.step([0], optimizer),
    ):
        (model(torch.full((1, 6), float("inf"))).sum()).backward()
    assert dvemb.open_log(log_dir).num_steps == 1  # the good step was flushed


def test_hand_written_update_with_lr(log_dir: Path) -> None:
    model = mlp()
    rec = dvemb.Recorder(model, log_dir, loss_reduction="sum")
    with rec.step([7, 8], lr=0.3):
        F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1]), reduction="sum").backward()
    rec.close()
    assert dvemb.open_log(log_dir).read_shard(0).lr.tolist() == [[0.3, 0.3]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"proj_dim": 10}, "not a positive square"),
        ({"proj_dim": "big"}, "must be None, a square int"),
        ({"curvature": "fisher"}, "curvature='fisher' is not one of"),
        ({"loss_reduction": "avg"}, "loss_reduction='avg'"),
        ({"dtype": "int8"}, "dtype='int8'"),
        ({"layers": ["nope"]}, "no module matches 'nope'"),
        ({"layers": ["1"]}, "is a ReLU; dvemb records Linear, Conv2d, Embedding"),
        ({"curvature_samples": 0}, "curvature_samples"),
    ],
)
def test_bad_arguments_name_the_problem(log_dir: Path, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(dvemb.ConfigError, match=message):
        dvemb.Recorder(mlp(), log_dir, **kwargs)  # type: ignore[arg-type]
    assert not (log_dir / "manifest.json").exists()


def test_step_needs_optimizer_or_lr_and_ids(log_dir: Path) -> None:
    rec = dvemb.Recorder(mlp(), log_dir)
    with pytest.raises(dvemb.ConfigError, match="needs the optimizer"), rec.step([0]):
        pass
    with pytest.raises(dvemb.ConfigError, match="no example ids"), rec.step([], lr=0.1):
        pass
    with pytest.raises(dvemb.ConfigError, match="not floats"), rec.step(torch.tensor([0.5]), lr=0.1):
        pass


def test_layer_called_twice_per_forward_is_refused(log_dir: Path) -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    rec = dvemb.Recorder(model, log_dir)
    with pytest.raises(dvemb.RecorderError, match="called twice"), rec.step([0, 1], lr=0.1):
        model(torch.randn(2, 4)).sum().backward()


def test_queries_leave_parameter_grads_and_mode_alone(log_dir: Path) -> None:
    model = mlp()
    model.train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rec = dvemb.Recorder(model, log_dir, proj_dim=None, dtype="float64")
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    count = rec.record_queries("test-set", [(x[:3], y[:3]), (x[3:], y[3:])])
    rec.close()
    assert count == 4 and model.training
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters() if p.grad is not None)
    log = dvemb.open_log(log_dir)
    queries = log.load_query_set("test-set")
    assert queries.ids == [0, 1, 2, 3] and queries.labels is not None and queries.labels.tolist() == y.tolist()
    reference = per_example_grads(model, ce_mean_over_positions, x, y)
    for layer in log.layers:
        expected = layer_matrix(model, layer.name, reference).flatten(1)
        assert (queries.grads[layer.name] - expected).abs().max() < 1e-12


def test_query_set_name_is_checked(log_dir: Path) -> None:
    rec = dvemb.Recorder(mlp(), log_dir)
    with pytest.raises(dvemb.ConfigError, match="query set name '../x'"):
        rec.record_queries("../x", [])


def test_a_later_test_gradient_lands_in_the_query_space(log_dir: Path) -> None:
    """project_model_gradient (client side, manifest only) equals what record_queries stored."""
    model = TinyLM()
    rec = dvemb.Recorder(model, log_dir, layers="all", proj_dim=(3, 2), dtype="float64")
    tokens, targets = torch.randint(0, 7, (1, 4)), torch.randint(0, 7, (1, 4))
    rec.record_queries("one", [(tokens, targets)])
    rec.close()
    log = dvemb.open_log(log_dir)
    model.zero_grad()
    F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten()).backward()
    projected = dvemb.project_model_gradient(log.manifest, model)
    stored = log.load_query_set("one").grads
    assert set(projected) == {"embed", "mix", "head"}
    for name, vector in projected.items():
        assert (vector - stored[name][0]).abs().max() < 1e-12
    with pytest.raises(dvemb.ConfigError, match="pass the recorded model"):
        dvemb.project_model_gradient(log.manifest, mlp())


def test_an_example_twice_in_one_step_is_refused_before_the_step_runs(log_dir: Path) -> None:
    """The reader refuses a log with an id twice in one step; the recorder says so at rec.step(), before the
    update, for ids given up front and for ids added per micro-batch."""
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, loss_reduction="sum", projection="random", curvature="empirical")
    twice = r"example id 3 appears twice in step 0.*f'\{index\}#\{draw\}'"
    with pytest.raises(dvemb.RecorderError, match=twice), rec.step([1, 3, 3], optimizer):
        F.cross_entropy(model(torch.randn(3, 6)), torch.tensor([0, 1, 2]), reduction="sum").backward()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(dvemb.RecorderError, match="example id 'a' appears twice"), rec.step(None, optimizer):
        for ids in (["a", "b"], ["a"]):
            rec.add_ids(ids)
            F.cross_entropy(model(torch.randn(len(ids), 6)), torch.zeros(len(ids), dtype=torch.long)).backward()
        optimizer.step()
    with rec.step([1, 2, 3], optimizer):  # the recorder goes on
        F.cross_entropy(model(torch.randn(3, 6)), torch.tensor([0, 1, 2]), reduction="sum").backward()
        optimizer.step()
        optimizer.zero_grad()
    rec.close()
    assert dvemb.open_log(log_dir).num_steps == 1


# dynamo itself reads .grad of a non-leaf tensor while tracing a Linear around the hooks' graph breaks (a warning that
# this suite turns into an error; torch's own, not dvemb's).
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")
def test_a_compiled_model_records_as_the_model_it_compiled(tmp_path: Path) -> None:
    """``torch.compile(model)``: the layers keep the names the user knows (no ``_orig_mod.`` prefix) and the log's
    gradient and Gauss-Newton rows equal the uncompiled model's, bit for bit (dynamo's eager backend: the wrapper
    and its guards, without a C++ build)."""

    def record(compiled: bool) -> dvemb.ShardData:
        torch.manual_seed(0)
        model = mlp()
        trained = torch.compile(model, backend="eager") if compiled else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = torch.randn(8, 6, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
        rec = dvemb.Recorder(trained, tmp_path / ("compiled" if compiled else "plain"), proj_dim=None)
        for step in range(3):
            with rec.step(list(range(8 * step, 8 * step + 8)), optimizer):
                F.cross_entropy(trained(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()
        rec.close()
        return next(dvemb.open_log(tmp_path / ("compiled" if compiled else "plain")).iter_shards())

    plain, compiled = record(False), record(True)
    assert dvemb.open_log(tmp_path / "compiled").manifest["model"] == "Sequential"  # not dynamo's OptimizedModule
    assert list(compiled.grads) == list(plain.grads) and not any("_orig_mod" in name for name in compiled.grads)
    for name in plain.grads:
        assert torch.equal(compiled.grads[name], plain.grads[name])
        assert torch.equal(compiled.curvature[name], plain.curvature[name])
