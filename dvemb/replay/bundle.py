"""A replay bundle: everything a replay needs beyond the log, in one safetensors file, so that a worker of the
service can replay a run without the user's code (docs/replay.md, "In the service").

The file ``replay-bundle.safetensors`` holds tensors only, and one JSON document in its metadata (key
``dvemb-replay-bundle``); nothing in it is executed or unpickled:

- ``model.<name>``: the model's weights at initialisation (its state dict, tied weights once);
- ``optimizer.<param index>.<key>``: the optimizer's initial state tensors (empty before the first step);
- ``examples.<field>``: (N, ...) every training example's fields, rows in the order of the document's ``ids``;
- ``queries.<set>.<field>``: (Q, ...) each query set's examples.

The document (format ``dvemb-replay-bundle``, version 1) says how to rebuild the rest: the model
(:mod:`dvemb.replay.bundle_models`: a ``torch.nn.Sequential`` of common layers, or a ``transformers`` model from
its config), the loss (:mod:`dvemb.replay.losses`), the optimizer's class and parameter groups (as
:func:`dvemb.replay.save_initial` keeps them), the example ids, the query sets' sizes, and the run's autocast
and micro-batches. Fields: ``labels`` is the target; every other field is a model input (a ``Sequential`` takes
one, ``inputs``; a ``transformers`` model takes them by name).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from dvemb.atomic import replacing
from dvemb.errors import ConfigError
from dvemb.formats import REPLAY_BUNDLE
from dvemb.replay.bundle_models import build_model, describe_model
from dvemb.replay.initial import load_optimizer_state, optimizer_state_parts, saved_groups
from dvemb.replay.losses import LOSSES, TOKEN_COUNTS, per_example_loss
from dvemb.replay.optimizers import SUPPORTED
from dvemb.replay.training import Examples, LossFn, check_replayable

__all__ = [
    "BUNDLE_NAME",
    "FORMAT",
    "BuiltBundle",
    "check_bundle",
    "open_bundle",
    "read_spec",
    "write_bundle",
]

BUNDLE_NAME = REPLAY_BUNDLE
FORMAT = "dvemb-replay-bundle"
VERSION = 1
METADATA_KEY = FORMAT
#: Rows of a query set evaluated at once (memory of one part; the query loss is the same).
QUERY_BATCH = 256
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def write_bundle(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ids: Sequence[int | str],
    examples: Mapping[str, torch.Tensor],
    query_sets: Mapping[str, Mapping[str, torch.Tensor]],
    loss: str = "cross_entropy",
    token_count: str = "shifted",
    model_spec: dict[str, Any] | None = None,
    autocast: str | None = None,
    micro_batches: int = 1,
) -> Path:
    """Write a replay bundle (call it with the model and optimizer as they were before the first step, e.g. right
    after building them, or after :func:`dvemb.replay.load_initial`).

    Args:
        path: the file to write (``replay-bundle.safetensors`` next to the log is what ``dvemb upload`` sends).
        model: the model at initialisation; rebuilt on the service from ``model_spec``.
        optimizer: the run's optimizer in its initial state (SGD, Adam or AdamW).
        ids: the example id of each row of ``examples`` (the ids the log records).
        examples: field -> (N, ...) tensor; ``labels`` is the target, the rest model inputs (module docstring).
        query_sets: set name -> its fields, as ``examples``; the names of the results' query sets it stands for.
        loss: ``"cross_entropy"`` or ``"causal_lm"`` (dvemb.replay.losses), with ``token_count`` for the latter.
        model_spec: how to rebuild the model; default :func:`dvemb.replay.bundle_models.describe_model`.
        autocast, micro_batches: as the run trained (``ReplayArguments``).

    Returns:
        the written path.
    """
    spec: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": model_spec or describe_model(model),
        "tied": _ties(model),
        "loss": {"kind": loss, "token_count": token_count},
        "ids": [i if isinstance(i, str) else int(i) for i in ids],
        "query_sets": {name: _rows(fields, f"query set {name!r}") for name, fields in query_sets.items()},
        "replay": {"autocast": autocast, "micro_batches": int(micro_batches)},
    }
    tensors, numbers, groups = optimizer_state_parts(optimizer)
    name_of = {id(p): name for name, p in model.named_parameters()}
    if any(id(p) not in name_of for g in optimizer.param_groups for p in g["params"]):
        raise ConfigError("the optimizer holds parameters that are not the model's")
    spec["optimizer"] = {
        "class": type(optimizer).__name__,
        "param_groups": groups,
        # The model's name of each parameter of each group (the state's indices are the optimizer's numbering).
        "param_names": [[name_of[id(p)] for p in g["params"]] for g in optimizer.param_groups],
        "state_numbers": numbers,
    }
    tensors.update({f"model.{name}": value for name, value in _untied(model).items()})
    tensors.update({f"examples.{field}": value for field, value in examples.items()})
    for name, fields in query_sets.items():
        tensors.update({f"queries.{name}.{field}": value for field, value in fields.items()})
    _check_spec(spec)
    _check_tables(spec, {name: tuple(t.shape) for name, t in tensors.items()})
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with replacing(target) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(tmp),
            metadata={METADATA_KEY: json.dumps(spec)},
        )
    return target


def read_spec(path: str | Path) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The bundle's document, checked, and its tensors' shapes by name (reads the header only).

    Raises:
        ConfigError: not a safetensors file, no document, or a document or table that does not hold together.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a malformed header
        raise ConfigError(f"{Path(path).name} is not a readable safetensors file ({error})") from error
    if METADATA_KEY not in metadata:
        raise ConfigError(
            f"{Path(path).name} is not a replay bundle (no {METADATA_KEY!r} metadata); write it with "
            "dvemb.replay.write_bundle or dvemb.integrations.hf_replay.bundle_trainer"
        )
    try:
        spec = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ConfigError(f"{Path(path).name}: the bundle's document is not JSON ({error})") from error
    _check_spec(spec)
    _check_tables(spec, shapes)
    return spec, shapes


@dataclass
class BuiltBundle:
    """What a replay needs, rebuilt from a bundle.

    Attributes:
        model: the model at initialisation (eager attention for a ``transformers`` model).
        optimizer: the run's optimizer in its initial state.
        loss_fn: ``(forward, batch) -> (b,)`` per-example losses.
        examples: ``ids -> batch`` (a dict of fields on the model's device).
        query_sets: set name -> its query batches (at most :data:`QUERY_BATCH` rows each).
        autocast, micro_batches: as the run trained.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: LossFn
    examples: Examples
    query_sets: dict[str, list[dict[str, torch.Tensor]]]
    autocast: str | None
    micro_batches: int


def open_bundle(path: str | Path, device: str | torch.device = "cpu") -> BuiltBundle:
    """Rebuild the model, optimizer, loss and data of a bundle on ``device``.

    Raises:
        ConfigError: what :func:`read_spec` refuses, weights that do not fit the described model, or an optimizer
            state that does not fit its parameters.
    """
    spec, _ = read_spec(path)
    tensors: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():  # noqa: SIM118
            tensors[name] = handle.get_tensor(name)
    model = build_model(spec["model"]).to(device)
    _tie(model, spec.get("tied", []))
    _load_weights(model, _section(tensors, "model."))
    model.train()
    optimizer = _optimizer(spec["optimizer"], model, {n: t for n, t in tensors.items() if n.startswith("optimizer.")})
    fields = {k: v.to(device) for k, v in _section(tensors, "examples.").items()}
    row_of = {_key(i): row for row, i in enumerate(spec["ids"])}

    def examples(ids: list[Any]) -> dict[str, torch.Tensor]:
        try:
            rows = torch.tensor([row_of[_key(i)] for i in ids], device=device)
        except KeyError as missing:
            raise ConfigError(
                f"example id {missing.args[0]!r} of the log is not in the replay bundle: write the bundle with "
                "every example the run trained on"
            ) from None
        return {field: value.index_select(0, rows) for field, value in fields.items()}

    per_example = per_example_loss(spec["loss"]["kind"], spec["loss"]["token_count"])
    positional = spec["model"]["kind"] == "sequential"

    def loss_fn(forward: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        output = forward(inputs["inputs"]) if positional else forward(**inputs)
        logits = output.logits if hasattr(output, "logits") else output
        return per_example(logits, batch["labels"])

    query_sets = {}
    for name in spec["query_sets"]:
        table = {k: v.to(device) for k, v in _section(tensors, f"queries.{name}.").items()}
        size = spec["query_sets"][name]
        query_sets[name] = [
            {k: v[start : start + QUERY_BATCH] for k, v in table.items()} for start in range(0, size, QUERY_BATCH)
        ]
    replay = spec["replay"]
    return BuiltBundle(model, optimizer, loss_fn, examples, query_sets, replay["autocast"], replay["micro_batches"])


def check_bundle(path: str | Path) -> dict[str, Any]:
    """Everything :func:`open_bundle` checks, on the CPU, and the loss of each query set at the initial weights
    (finite); returns the document. What the service's validator runs before a bundle is visible to a replay."""
    built = open_bundle(path)
    check_replayable(built.model)
    with torch.no_grad():
        for name, batches in built.query_sets.items():
            for batch in batches:
                losses = built.loss_fn(built.model, batch)
                if losses.dim() != 1 or not bool(torch.isfinite(losses).all()):
                    raise ConfigError(f"the bundle's query set {name!r} gives no finite per-example loss")
    return read_spec(path)[0]


# -- checks ---------------------------------------------------------------------------------------------------


def _rows(fields: Mapping[str, torch.Tensor], what: str) -> int:
    sizes = {int(v.shape[0]) if v.dim() else -1 for v in fields.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise ConfigError(f"the fields of {what} must all have the same number of rows, got {sorted(sizes)}")
    return sizes.pop()


def _check_spec(spec: Any) -> None:
    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ConfigError(f"replay bundle: {problem}")

    need(isinstance(spec, dict), "the document is not a JSON object")
    need(spec.get("format") == FORMAT and spec.get("version") == VERSION, f"not a {FORMAT} version {VERSION}")
    need(isinstance(spec.get("model"), dict), "no model description")
    loss = spec.get("loss")
    need(isinstance(loss, dict) and loss.get("kind") in LOSSES, f"loss kind must be one of {', '.join(LOSSES)}")
    need(loss.get("token_count") in TOKEN_COUNTS, f"token_count must be one of {', '.join(TOKEN_COUNTS)}")
    ids = spec.get("ids")
    need(isinstance(ids, list) and len(ids) > 0, "no example ids")
    need(all(isinstance(i, int | str) and not isinstance(i, bool) for i in ids), "example ids are integers or text")
    need(len({_key(i) for i in ids}) == len(ids), "example ids repeat")
    sets = spec.get("query_sets")
    need(isinstance(sets, dict) and len(sets) > 0, "no query set")
    for name, size in sets.items():
        need(bool(_SET_NAME.match(name)), f"query set name {name!r}: letters, digits, '_', '.', '-' (at most 64)")
        need(isinstance(size, int) and size > 0, f"query set {name!r} has no rows")
    opt = spec.get("optimizer")
    need(isinstance(opt, dict) and opt.get("class") in SUPPORTED, f"optimizer must be one of {', '.join(SUPPORTED)}")
    groups = opt.get("param_groups")
    need(isinstance(groups, list) and all(isinstance(g, dict) for g in groups) and len(groups) > 0, "no param groups")
    need(isinstance(opt.get("state_numbers"), dict), "no optimizer state numbers")
    replay = spec.get("replay")
    need(isinstance(replay, dict), "no replay settings")
    need(replay.get("autocast") in (None, "bfloat16", "float16"), "autocast is null, 'bfloat16' or 'float16'")
    micro = replay.get("micro_batches")
    need(isinstance(micro, int) and micro >= 1, "micro_batches is an integer of at least 1")


def _check_tables(spec: dict[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Every tensor is in a known section, and the data tables have the rows the document says."""
    tables: dict[str, int] = {"examples.": len(spec["ids"])}
    tables.update({f"queries.{name}.": size for name, size in spec["query_sets"].items()})
    seen: dict[str, set[str]] = {prefix: set() for prefix in tables}
    for name, shape in shapes.items():
        if name.startswith(("model.", "optimizer.")):
            continue
        prefix = next((p for p in tables if name.startswith(p) and _FIELD.match(name[len(p) :])), None)
        if prefix is None:
            raise ConfigError(f"replay bundle: tensor {name!r} is in no known section (model, optimizer, data)")
        if not shape or shape[0] != tables[prefix]:
            raise ConfigError(
                f"replay bundle: tensor {name!r} has shape {list(shape)}; its table has {tables[prefix]} rows"
            )
        seen[prefix].add(name[len(prefix) :])
    for prefix, fields in seen.items():
        if "labels" not in fields or len(fields) < 2:
            raise ConfigError(f"replay bundle: table {prefix.rstrip('.')!r} needs 'labels' and at least one input")
        if spec["model"].get("kind") == "sequential" and fields != {"inputs", "labels"}:
            raise ConfigError(
                f"replay bundle: a Sequential model's table {prefix.rstrip('.')!r} has the fields 'inputs' and "
                f"'labels', not {sorted(fields)}"
            )


# -- model and optimizer ---------------------------------------------------------------------------------------


def _key(example_id: Any) -> str:
    """Ids compare as text (a log read back from JSON may hold 7 where the data set held '7')."""
    return str(example_id)


def _section(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def _untied(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (safetensors refuses shared storage)."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, value in model.state_dict().items():
        identity = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if identity in seen:
            continue
        seen.add(identity)
        kept[name] = value
    return kept


def _ties(model: nn.Module) -> list[list[str]]:
    """``[alias, source]`` for every parameter that is another's (a tied weight), by name."""
    first: dict[int, str] = {}
    ties = []
    for name, value in model.named_parameters(remove_duplicate=False):
        if id(value) in first:
            ties.append([name, first[id(value)]])
        else:
            first[id(value)] = name
    return ties


def _tie(model: nn.Module, ties: Any) -> None:
    """Make each alias the same parameter as its source (a model built from its description has them apart)."""
    if not isinstance(ties, list):
        raise ConfigError("replay bundle: 'tied' is a list of [alias, source] parameter names")
    parameters = dict(model.named_parameters(remove_duplicate=False))
    for pair in ties:
        if not (isinstance(pair, list) and len(pair) == 2 and all(name in parameters for name in pair)):
            raise ConfigError(f"replay bundle: tied parameters {pair!r} are not parameters of the described model")
        owner, _, attribute = pair[0].rpartition(".")
        setattr(model.get_submodule(owner), attribute, parameters[pair[1]])


def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = _untied(model)
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(model.state_dict()))
    if missing or unexpected:
        raise ConfigError(
            f"replay bundle: the weights do not fit the described model (missing {missing[:5]}, "
            f"unexpected {unexpected[:5]})"
        )
    try:
        model.load_state_dict(weights, strict=False)
    except RuntimeError as error:
        raise ConfigError(f"replay bundle: the weights do not fit the described model: {error}") from error


def _optimizer(spec: dict[str, Any], model: nn.Module, state_tensors: dict[str, torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of ``spec``'s class over ``model``'s parameters, in the groups (by parameter name) it was saved
    with, and its saved state."""
    parameters = dict(model.named_parameters())
    names = spec.get("param_names")
    saved = saved_groups(spec["param_groups"])
    if not isinstance(names, list) or len(names) != len(saved):
        raise ConfigError("replay bundle: the optimizer's parameter names do not match its groups")
    groups = []
    for group, group_names in zip(saved, names, strict=True):
        unknown = [n for n in group_names if n not in parameters] if isinstance(group_names, list) else [group_names]
        if unknown or len(group_names) != len(group.get("params", ())):
            raise ConfigError(f"replay bundle: a parameter group names parameters the model has not: {unknown[:5]}")
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [parameters[n] for n in group_names]})
    build: Any = getattr(torch.optim, spec["class"])
    try:
        optimizer: torch.optim.Optimizer = build(groups)
        load_optimizer_state(optimizer, state_tensors, spec["state_numbers"], spec["param_groups"])
    except (TypeError, ValueError, KeyError, RuntimeError) as error:
        raise ConfigError(
            f"replay bundle: the optimizer cannot be rebuilt ({type(error).__name__}: {error})"
        ) from error
    return optimizer
