"""ggn by default: Gauss-Newton rows found from the model's own output, with no extra line in the loop."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import TinyLM, mlp
from reference import per_example_ggn
from torch import nn

import dvemb
from dvemb.output_curvature import cross_entropy_weights, find_logits

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _train(
    model: nn.Module,
    log_dir: Path,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Loss,
    *,
    explicit: bool,
    micro_batches: int = 1,
    **options: object,
) -> None:
    """A few SGD steps, each over ``micro_batches`` accumulated micro-batches, recorded in ggn mode."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, curvature="ggn", dtype="float64", **options)  # type: ignore[arg-type]
    first = 0
    for x, y in data:
        with rec.step(list(range(first, first + len(x))), optimizer):
            for part_x, part_y in zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True):
                logits = model(part_x)
                if explicit:
                    rec.curvature(logits)
                (loss_fn(logits, part_y) / micro_batches).backward()
            optimizer.step()
            optimizer.zero_grad()
        first += len(x)
    rec.close()


def _shards(log_dir: Path) -> list[dvemb.ShardData]:
    return list(dvemb.open_log(log_dir).iter_shards())


def _assert_same_logs(a: Path, b: Path, tolerance: float) -> None:
    for left, right in zip(_shards(a), _shards(b), strict=True):
        for name in left.grads:
            assert torch.equal(left.grads[name], right.grads[name])
            scale = right.curvature[name].abs().max()
            assert (left.curvature[name] - right.curvature[name]).abs().max() <= tolerance * scale, name


def _classification_data(steps: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(6, 6, generator=generator), torch.randint(0, 3, (6,), generator=generator)) for _ in range(steps)
    ]


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


@pytest.mark.parametrize("micro_batches", [1, 2], ids=["one-batch", "accumulated"])
def test_rows_found_at_the_output_equal_explicit_curvature_calls(tmp_path: Path, micro_batches: int) -> None:
    """All-class rows (3 classes), mean cross-entropy, with and without gradient accumulation."""
    for explicit in (False, True):
        torch.manual_seed(0)
        _train(
            mlp(), tmp_path / str(explicit), _classification_data(), F.cross_entropy, explicit=explicit,
            micro_batches=micro_batches, proj_dim=None,
        )  # fmt: skip
    _assert_same_logs(tmp_path / "False", tmp_path / "True", 1e-12)
    curvature = dvemb.open_log(tmp_path / "False").manifest["curvature"]
    assert curvature["source"] == "output" and curvature["loss"] == "cross_entropy"
    assert dvemb.open_log(tmp_path / "True").manifest["curvature"]["source"] == "manual"


def test_sampled_sequence_rows_found_at_the_output_equal_explicit_calls(tmp_path: Path) -> None:
    """A token-mean LM loss over (B, L, V) logits: sampled labels with the same seed, projected layers."""
    generator = torch.Generator().manual_seed(2)
    data = [(torch.randint(1, 7, (4, 5), generator=generator), torch.randint(0, 7, (4, 5), generator=generator))]
    for explicit in (False, True):
        torch.manual_seed(0)
        model = TinyLM(vocab=7, width=4, hidden=6)
        options = {"layers": "all", "proj_dim": (2, 2), "projection": "random"}
        _train(model, tmp_path / str(explicit), data * 2, _lm_loss, explicit=explicit, **options)
    _assert_same_logs(tmp_path / "False", tmp_path / "True", 1e-12)


def test_output_rows_give_the_exact_ggn_of_the_batch(tmp_path: Path) -> None:
    """Against the Gauss-Newton matrix built directly (not against another path of the recorder)."""
    model = mlp(classes=4)
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = dvemb.Recorder(model, tmp_path / "log", dtype="float64", proj_dim=None)  # the defaults: ggn
    with rec.step(list(range(5)), optimizer):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    rec.close()
    shard = _shards(tmp_path / "log")[0]
    for layer in dvemb.open_log(tmp_path / "log").layers:
        factors = shard.curvature[layer.name]  # (N, C, d)
        from_factors = torch.einsum("ncd,nce->de", factors, factors)
        exact = per_example_ggn(model, layer.name, x).sum(0)
        assert (from_factors - exact).abs().max() < 1e-10 * exact.abs().max()


def test_mean_squared_error_rows_give_its_gauss_newton_matrix(tmp_path: Path) -> None:
    """curvature_loss='mse': per-example loss the mean over D outputs, GGN = J^T (2/D) J."""
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(4, 3), torch.randn(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = dvemb.Recorder(model, tmp_path / "log", dtype="float64", proj_dim=None, curvature_loss="mse")
    with rec.step(list(range(4)), optimizer):
        F.mse_loss(model(x), y).backward()
        optimizer.step()
    rec.close()
    factors = _shards(tmp_path / "log")[0].curvature["0"]  # (N, R, d)
    ggn = torch.einsum("nrd,nre->nde", factors, factors)
    inputs = torch.cat([x, torch.ones(4, 1)], 1)  # (N, 4) with the bias column
    expected = torch.stack([torch.kron(torch.eye(2), torch.outer(v, v)) for v in inputs]) * (2.0 / 2)  # J^T (2/D) J
    assert (ggn - expected).abs().max() < 1e-12


def test_a_loss_that_is_not_cross_entropy_is_refused_at_step_zero(tmp_path: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, tmp_path / "log")
    with pytest.raises(dvemb.RecorderError, match="curvature='empirical'") as caught, rec.step([0, 1], optimizer):
        F.mse_loss(model(torch.randn(2, 6)), torch.randn(2, 3)).backward()
        optimizer.step()
    assert "step 0" in str(caught.value) and "curvature_loss='mse'" in str(caught.value)
    assert dvemb.open_log(tmp_path / "log").num_steps == 0


def test_label_smoothing_is_refused(tmp_path: Path) -> None:
    model = mlp()
    rec = dvemb.Recorder(model, tmp_path / "log")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(dvemb.RecorderError, match="not softmax cross-entropy"), rec.step([0, 1], optimizer):
        F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 2]), label_smoothing=0.1).backward()
        optimizer.step()


def test_cross_entropy_weights_follow_the_loss_weighting() -> None:
    """A token mean with ignored positions: weight 1/N at the N counted positions, 0 where the label is -100."""
    logits = torch.randn(3, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (3, 4))
    labels[0, 1] = labels[2, 3] = -100
    F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    assert logits.grad is not None
    weights, misfit = cross_entropy_weights(logits, logits.grad)
    expected = (labels != -100).double() / 10
    assert misfit < 1e-12 and (weights - expected).abs().max() < 1e-15


def test_find_logits_takes_what_models_return() -> None:
    logits = torch.zeros(2, 3)

    class Output(dict[str, torch.Tensor]):
        pass

    assert find_logits(logits) is logits
    assert find_logits((logits, torch.ones(1))) is logits
    assert find_logits(Output(logits=logits)) is logits
    assert find_logits("text") is None


def test_untracked_parameters_are_named_at_the_first_step(tmp_path: Path) -> None:
    """A GRU + Linear model tracks only its head (about 2% here): the first step warns and names the GRU."""

    class Recurrent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(8, 32, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.gru(x)[0][:, -1])  # type: ignore[no-any-return]

    model = Recurrent()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, tmp_path / "gru", projection="random")
    assert rec.tracked_fraction < 0.1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # the suite's configuration ignores this warning for its partial models
        with rec.step([0, 1], optimizer):
            F.cross_entropy(model(torch.randn(2, 4, 8)), torch.tensor([0, 1])).backward()
            optimizer.step()
    messages = [str(w.message) for w in caught if issubclass(w.category, dvemb.DvembWarning)]
    assert len(messages) == 1 and "gru (GRU, 4,032 parameters)" in messages[0]
    assert "cannot be tracked" in messages[0] and "2.4% of the model's trainable parameters" in messages[0]
    rec.close()
    assert dvemb.open_log(tmp_path / "gru").manifest["tracked_parameters"] == rec.tracked_parameters

    mlp_model = mlp()
    mlp_optimizer = torch.optim.SGD(mlp_model.parameters(), lr=0.1)
    rec = dvemb.Recorder(mlp_model, tmp_path / "mlp")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter of an MLP is tracked: no warning
        with rec.step([0, 1], mlp_optimizer):
            F.cross_entropy(mlp_model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
            mlp_optimizer.step()
    rec.close()


def test_bfloat16_autocast_logits_are_accepted_and_give_the_float32_rows(tmp_path: Path) -> None:
    """Under CPU autocast the logits and their gradient are bfloat16: the cross-entropy check allows for that,
    and the rows equal those of the same step without autocast to bfloat16 precision."""
    logs = {}
    for name, enabled in (("bf16", True), ("fp32", False)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).float()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        rec = dvemb.Recorder(model, tmp_path / name, proj_dim=None)
        x, y = torch.randn(5, 6, dtype=torch.float32), torch.randint(0, 3, (5,))  # autocast leaves float64 alone
        with rec.step(list(range(5)), optimizer):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        rec.close()
        logs[name] = _shards(tmp_path / name)[0]
    for layer, rows in logs["fp32"].curvature.items():
        assert (logs["bf16"].curvature[layer] - rows).abs().max() < 3e-2 * rows.abs().max(), layer
