"""dvemb.formats: names, the id codec, phases and the typed manifest, against what the writer writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from core_models import mlp

import dvemb
from dvemb import formats
from dvemb.formats import LayerEntry, Manifest, ManifestError


def _log(log_dir: Path) -> dict[str, object]:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, proj_dim=(2, 3), projection="random")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with rec.step(["a", "b", "c", "d"], optimizer):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    rec.record_queries("val", [(x[:2], y[:2])])
    rec.close()
    return json.loads((log_dir / formats.MANIFEST).read_text())  # type: ignore[no-any-return]


def test_the_typed_manifest_reads_what_the_writer_writes_and_gives_it_back(log_dir: Path) -> None:
    data = _log(log_dir)
    manifest = Manifest.from_json(data)
    assert [layer.name for layer in manifest.layers] == ["0", "2"] and manifest.total_dim == 12
    assert manifest.query_sets[0].name == "val" and manifest.num_steps == 1
    assert manifest.to_json() == data
    assert set(formats.listed_files([data])) == {p.name for p in log_dir.iterdir() if formats.is_log_file_name(p.name)}


def test_the_typed_manifest_gives_back_an_adamw_log_and_the_shipped_one(log_dir: Path) -> None:
    """Fields the typed manifest models beyond the basics (each layer's ``second_moment``, the optimizer, curvature,
    parameter counts, the id type) come back as written, and read typed."""
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = dvemb.Recorder(model, log_dir, curvature="ggn")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    for _ in range(2):
        with rec.step([1, 2, 3, 4], optimizer):
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    data = json.loads((log_dir / formats.MANIFEST).read_text())
    manifest = Manifest.from_json(data)
    assert manifest.to_json() == data
    assert any(layer.second_moment is not None for layer in manifest.layers)
    assert manifest.optimizer["type"] == "AdamW" and manifest.curvature_mode == "ggn" and manifest.id_type == "int"
    assert manifest.tracked_parameters == data["tracked_parameters"] and manifest.model == data["model"]
    log = dvemb.open_log(log_dir)
    assert log.info.layers == manifest.layers and log.info.num_steps == 2
    shipped = json.loads((Path(__file__).parent / "data" / "log_v2" / formats.MANIFEST).read_text())
    assert Manifest.from_json(shipped).to_json() == shipped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"out_dim": -3}, "out_dim must be an integer"),
        ({"k_out": 99}, "k_out must be an integer in 1..5"),
        ({"name": "../../etc/passwd"}, "not a valid name"),
        ({"name": "a/b"}, "not a valid name"),
        ({"kind": "lstm"}, "kind has an unknown value"),
        ({"seed_in": "7"}, "seed_in must be an integer"),
    ],
)
def test_a_bad_layer_entry_is_refused_naming_the_field(log_dir: Path, change: dict[str, object], message: str) -> None:
    data = _log(log_dir)
    data["layers"][0].update(change)  # type: ignore[index]
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(data)
    (log_dir / formats.MANIFEST).write_text(json.dumps(data))
    with pytest.raises(dvemb.LogFormatError, match="malformed manifest"):  # the reader refuses it too
        dvemb.open_log(log_dir)


def test_manifest_ranges() -> None:
    with pytest.raises(ManifestError, match="world_size"):
        Manifest.from_json({"world_size": 0})
    with pytest.raises(ManifestError, match="layer 'fc' lacks 'out_dim'"):
        LayerEntry.from_json({"name": "fc"})


def test_ids_round_trip_without_torch() -> None:
    for ids in ([3, 1, 2**40], ["α", "", "b/c"], []):
        arrays = formats.encode_ids(ids)
        assert all(isinstance(a, np.ndarray) for a in arrays.values())
        assert formats.decode_ids(arrays) == ids
    with pytest.raises(ValueError, match="all int or all str"):
        formats.encode_ids([1, "a"])


def test_names_and_phases() -> None:
    assert formats.is_log_file_name("shard-r0-000001.safetensors") and formats.is_manifest_name("manifest.rank3.json")
    for bad in ("../manifest.json", "manifest.json\n", "shard-r0-1.safetensors", "x/queries-val.safetensors"):
        assert not formats.is_log_file_name(bad)
    assert [formats.phase_of(s, [3, 7]) for s in (0, 3, 6, 7)] == ["early", "basin", "basin", "late"]
    assert formats.manifest_names(3) == ["manifest.json", "manifest.rank1.json", "manifest.rank2.json"]


def test_the_typed_summary_reads_what_the_engine_writes(log_dir: Path, tmp_path: Path) -> None:
    from dvemb.engine import compute
    from dvemb.formats import Summary, SummaryError

    _log(log_dir)
    written = compute(log_dir, tmp_path / "out")
    summary = Summary.from_json(written)
    assert (summary.steps, summary.occurrences, summary.examples, summary.top_k) == (1, 4, 4, 100)
    assert summary.query_set("val").num_queries == 2 and summary.save_embeddings
    assert summary.to_json() == json.loads((tmp_path / "out" / formats.SUMMARY).read_text())
    broken = json.loads(json.dumps(written))
    broken["query_sets"]["val"]["phases"]["boundaries"] = [5, 2]
    with pytest.raises(SummaryError, match="query set 'val'"):
        Summary.from_json(broken)


def test_unusable_string_ids_are_refused_when_recorded(log_dir: Path) -> None:
    with pytest.raises(ValueError, match="longer than 255 characters or holds a control character"):
        formats.encode_ids(["ok", "a" * 256])
    with pytest.raises(ValueError, match="control character"):
        formats.check_ids(["tab\tinside"])
    formats.check_ids(["é" * 255, "file.py:12"])
    rec = dvemb.Recorder(mlp(), log_dir, proj_dim=None)
    optimizer = torch.optim.SGD(rec.model.parameters(), lr=0.1)
    with pytest.raises(dvemb.ConfigError, match="example id 1"), rec.step(["a", "b\x00"], optimizer):
        pass
