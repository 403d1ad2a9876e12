"""What a log may not hold, refused by the validator with the reason (issue 21, partly held): the same example
twice in one step, negative ids, and NUL or bidirectional-override characters in example texts, labels and the
manifest's model name were all accepted."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from service_harness import Api, record_log

from dvemb.client import upload_log
from dvemb.writer import sha256_file

TUS = {"Tus-Resumable": "1.0.0"}


def _upload(api: Api, run_id: int, name: str, data: bytes) -> Any:
    meta = "filename " + base64.b64encode(name.encode()).decode()
    created = api.post(
        f"/runs/{run_id}/uploads", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": meta}
    )
    assert created.status_code == 201, created.text
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    return api.patch(created.headers["Location"], content=data, headers=headers)


def _rejected(api: Api, token: str, log: Path, name: str) -> dict[str, str]:
    result = upload_log(log, server=api.url, token=token, run_name=name)
    assert result["status"] != "ready", result
    return dict(result["rejected"])


def _rewrite_ids(log: Path, change: dict[int, int]) -> Path:
    """Change rows' example ids in the log's first shard (``row -> id``), the shard index and manifest vouching
    for the new bytes: a shard the recorder would not write (it refuses these ids itself, tests/core)."""
    shard = log / "shard-r0-000000.safetensors"
    tensors = load_file(str(shard))
    tensors["example_id"] = tensors["example_id"].clone()
    for row, example in change.items():
        tensors["example_id"][row] = example
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(shard))
    index = [json.loads(line) for line in (log / "shards.jsonl").read_text().splitlines()]
    index[0].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    (log / "shards.jsonl").write_text("".join(json.dumps(e) + "\n" for e in index))
    manifest = json.loads((log / "manifest.json").read_text())
    manifest["shard_index"].update(
        bytes=(log / "shards.jsonl").stat().st_size, sha256=sha256_file(log / "shards.jsonl")
    )
    (log / "manifest.json").write_text(json.dumps(manifest))
    return shard


def _spoil_example(log: Path, example: int, field: str, value: str) -> None:
    """Set one example record's ``field`` in the log's first examples file, the manifest vouching for the bytes."""
    path = log / "examples-000000.jsonl"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    next(r for r in records if r["id"] == example)[field] = value
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    manifest = json.loads((log / "manifest.json").read_text())
    entry = next(e for e in manifest["example_files"] if e["file"] == path.name)
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (log / "manifest.json").write_text(json.dumps(manifest))


def test_an_example_twice_in_one_step_is_refused(api: Api, token: str, tmp_path: Path) -> None:
    log = record_log(tmp_path / "twice", steps=4, shard_steps=2)
    first = int(load_file(str(log / "shard-r0-000000.safetensors"))["example_id"][0])
    _rewrite_ids(log, {1: first})  # rows 0 and 1 of step 0 now share an id
    rejected = _rejected(api, token, log, "twice")
    assert set(rejected) == {"shard-r0-000000.safetensors"}, rejected
    assert f"example id {first} appears twice in step 0" in rejected["shard-r0-000000.safetensors"]
    assert "its own id" in rejected["shard-r0-000000.safetensors"]


def test_a_negative_id_is_refused(api: Api, tmp_path: Path) -> None:
    """The recorder refuses one (tests/core); a shard that holds one anyway, vouched for by its index."""
    log = record_log(tmp_path / "negative", steps=4, shard_steps=4)
    shard = _rewrite_ids(log, {3: -7})
    run_id = int(api.post("/runs", json={"name": "negative"}).json()["id"])
    for name in ("manifest.json", "shards.jsonl"):
        assert _upload(api, run_id, name, (log / name).read_bytes()).status_code == 204
    refused = _upload(api, run_id, shard.name, shard.read_bytes())
    assert refused.status_code == 400 and "example id 3 is -7" in refused.json()["detail"], refused.text
    assert torch.equal(load_file(str(shard))["example_id"][3], torch.tensor(-7))


@pytest.mark.parametrize(
    ("field", "bad", "shown"),
    [("label", "cat\u202egnp.exe", "U+202E"), ("text", "a NUL \x00 here", "U+0000"), ("text", "x\u2066y", "U+2066")],
)
def test_nul_and_bidirectional_overrides_in_texts_are_refused(
    api: Api, token: str, tmp_path: Path, field: str, bad: str, shown: str
) -> None:
    """rec.describe refuses these itself now (tests/core/test_log_format.py); an examples file that holds them anyway,
    vouched for by its manifest, is refused by the validator."""
    log = record_log(tmp_path / "texts", steps=4, shard_steps=2)
    _spoil_example(log, 5, field, bad)
    rejected = _rejected(api, token, log, f"texts-{field}")
    assert list(rejected) == ["examples-000000.jsonl"], rejected
    assert f"(example 5): its {field} holds {shown}" in rejected["examples-000000.jsonl"]


@pytest.mark.parametrize(("model", "words"), [("Net\u202eevil", "holds U+202E"), ("Net\x00", "printable")])
def test_nul_and_bidirectional_overrides_in_the_model_name_are_refused(
    api: Api, tmp_path: Path, model: str, words: str
) -> None:
    log = record_log(tmp_path / "model", steps=2, shard_steps=2)
    manifest = json.loads((log / "manifest.json").read_text())
    run_id = int(api.post("/runs", json={"name": "model"}).json()["id"])
    refused = _upload(api, run_id, "manifest.json", json.dumps({**manifest, "model": model}).encode())
    assert refused.status_code == 400 and "'model'" in refused.json()["detail"], refused.text
    assert words in refused.json()["detail"]
    assert "\u202e" not in refused.json()["detail"] and "\x00" not in refused.json()["detail"]
