"""Writer/reader round trip, and every kind of damaged log rejected with its own clear error."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from core_models import mlp
from safetensors.torch import load_file, save_file

import dvemb
from dvemb import formats
from dvemb.writer import sha256_file


def _train(log_dir: Path, steps: int = 6, batch: int = 4, **kwargs: object) -> tuple[torch.nn.Module, list[list[int]]]:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, **{"proj_dim": 4, "shard_steps": 2, **kwargs})  # type: ignore[arg-type]
    all_ids = []
    for step in range(steps):
        ids = [step * batch + i for i in range(batch)]
        with rec.step(ids, optimizer):
            loss = F.cross_entropy(model(torch.randn(batch, 6)), torch.randint(0, 3, (batch,)))
            loss.backward()
            rec.log_loss(loss)
            optimizer.step()
            optimizer.zero_grad()
        all_ids.append(ids)
    rec.record_queries(
        "validation", [(torch.randn(3, 6), torch.tensor([0, 1, 2]), ["q0", "q1", "q2"])], texts=["a", "b", "c"]
    )
    rec.describe(
        [0, 1], texts=["first", "second"], labels=[2, 1], sources=["train.csv"] * 2, images=torch.rand(2, 8, 8)
    )
    rec.close()
    return model, all_ids


def test_round_trip(log_dir: Path) -> None:
    _, all_ids = _train(log_dir)
    log = dvemb.open_log(log_dir)
    log.validate()
    assert log.complete and log.num_steps == 6 and log.num_shards() == 3
    assert log.end_note() == "complete log of 6 steps"
    shards = list(log.iter_shards(reverse=True))
    assert [int(s.steps[0]) for s in shards] == [4, 2, 0]
    assert shards[-1].example_ids == all_ids[0] + all_ids[1]
    assert torch.isfinite(shards[0].loss).all() and shards[0].grads["0"].dtype == torch.float32
    queries = log.load_query_set("validation")
    assert queries.ids == ["q0", "q1", "q2"] and queries.texts == ["a", "b", "c"]
    assert queries.labels is not None and queries.labels.tolist() == [0, 1, 2] and queries.step == 6
    examples = list(log.iter_examples())
    assert examples[0]["text"] == "first" and examples[1]["label"] == 1 and examples[0]["image"].shape == (8, 8)
    assert log.manifest["optimizer"]["type"] == "SGD" and log.manifest["optimizer"]["exact_sgd"] is True


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_storage(log_dir: Path, dtype: str) -> None:
    _train(log_dir, dtype=dtype)
    log = dvemb.open_log(log_dir)
    shard = log.read_shard(0)
    assert shard.grads["0"].dtype == torch.float32  # converted on read
    assert load_file(str(log_dir / log.manifest["shards"][0]["file"]))["grad.0"].dtype == getattr(torch, dtype)
    assert log.manifest["shards"][0]["bytes"] < 2000


def test_string_ids_round_trip(log_dir: Path) -> None:
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with dvemb.Recorder(model, log_dir) as rec:
        with rec.step(["doc/α", "doc/β"], optimizer):
            F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
            optimizer.step()
        with pytest.raises(dvemb.ConfigError, match="one id type"), rec.step([1, 2], optimizer):
            F.cross_entropy(model(torch.randn(2, 6)), torch.tensor([0, 1])).backward()
    assert dvemb.open_log(log_dir).read_shard(0).example_ids == ["doc/α", "doc/β"]


def test_existing_log_is_never_overwritten_silently(log_dir: Path) -> None:
    _train(log_dir, steps=2)
    before = sha256_file(log_dir / "manifest.json")
    with pytest.raises(dvemb.ConfigError, match="overwrite=True"):
        dvemb.Recorder(mlp(), log_dir)
    assert sha256_file(log_dir / "manifest.json") == before
    dvemb.Recorder(mlp(), log_dir, overwrite=True).close()
    assert dvemb.open_log(log_dir).num_steps == 0


# -- damaged logs ---------------------------------------------------------------------------------


def _shard(log_dir: Path) -> Path:
    return log_dir / dvemb.open_log(log_dir).manifest["shards"][1]["file"]


def _index(log_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (log_dir / "shards.jsonl").read_text().splitlines()]


def _write_index(log_dir: Path, entries: list[dict[str, object]], *, tail: bytes = b"") -> None:
    """Replace the shard index and record its size and checksum in the manifest (when the log is closed)."""
    index = log_dir / "shards.jsonl"
    index.write_bytes("".join(json.dumps(e) + "\n" for e in entries).encode() + tail)
    manifest = json.loads((log_dir / "manifest.json").read_text())
    if manifest["complete"]:
        manifest["shard_index"].update(bytes=index.stat().st_size, sha256=sha256_file(index), num_shards=len(entries))
    (log_dir / "manifest.json").write_text(json.dumps(manifest))


def _reseal(log_dir: Path, path: Path) -> None:
    """Record a tampered file's true size and checksum, so that only the tampering itself is caught."""
    entries = _index(log_dir)
    for entry in entries:
        if entry["file"] == path.name:
            entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    _write_index(log_dir, entries)


def _read_all(log_dir: Path) -> None:
    dvemb.open_log(log_dir).validate()


def test_truncated_shard(log_dir: Path) -> None:
    _train(log_dir)
    path = _shard(log_dir)
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(dvemb.TruncatedFileError, match=rf"{path.name}.*truncated"):
        _read_all(log_dir)


def test_wrong_checksum(log_dir: Path) -> None:
    _train(log_dir)
    path = _shard(log_dir)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # flip a bit of a stored value: still a well-formed file
    path.write_bytes(bytes(data))
    with pytest.raises(dvemb.ChecksumError, match=rf"{path.name}.*sha256"):
        _read_all(log_dir)


def test_wrong_version(log_dir: Path) -> None:
    _train(log_dir)
    manifest = json.loads((log_dir / "manifest.json").read_text())
    manifest["version"] = 99
    (log_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dvemb.LogVersionError, match="version 99 is not supported"):
        dvemb.open_log(log_dir)


def test_nan_values(log_dir: Path) -> None:
    _train(log_dir)
    path = _shard(log_dir)
    tensors = load_file(str(path))
    tensors["grad.2"][1, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "dvemb-gradient-log"})
    _reseal(log_dir, path)
    with pytest.raises(dvemb.NonFiniteValueError, match=r"grad\.2.*1 NaN"):
        _read_all(log_dir)


@pytest.mark.parametrize(
    ("tamper", "error", "message"),
    [
        (lambda t: t.update(extra=torch.zeros(1_000)), dvemb.HeaderMismatchError, r"unexpected tensor\(s\) extra"),
        (lambda t: t["loss"].__setitem__(0, float("inf")), dvemb.NonFiniteValueError, "loss holds an infinite value"),
    ],
)
def test_a_shard_holds_only_what_the_format_lists(log_dir: Path, tamper: object, error: type, message: str) -> None:
    """Issue 13, item 15: extra tensors (a validator amplification vector) and an infinite loss are refused."""
    _train(log_dir)
    path = _shard(log_dir)
    tensors = load_file(str(path))
    tamper(tensors)  # type: ignore[operator]
    save_file(tensors, str(path), metadata={"format": "dvemb-gradient-log"})
    _reseal(log_dir, path)
    with pytest.raises(error, match=message):
        _read_all(log_dir)


def test_an_image_over_the_size_limit_is_refused(log_dir: Path) -> None:
    _train(log_dir)
    manifest = json.loads((log_dir / "manifest.json").read_text())
    entry = manifest["example_files"][0]
    path = log_dir / entry["file"]
    record = json.loads(path.read_text().splitlines()[0])
    record["image"] = {"shape": [256, 256, 4], "base64": base64.b64encode(bytes(256 * 256 * 4)).decode()}
    path.write_text(json.dumps(record) + "\n")
    entry.update(bytes=path.stat().st_size, sha256=sha256_file(path), num_examples=1)
    (log_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dvemb.LogFormatError, match=r"image of shape \[256, 256, 4\].*at most 65536 values"):
        _read_all(log_dir)


def test_header_that_lies_about_sizes(log_dir: Path) -> None:
    _train(log_dir)
    path = _shard(log_dir)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    rows, dim = header["grad.0"]["shape"]
    header["grad.0"]["shape"] = [rows * 2, dim]  # claims twice the rows its byte span holds
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])
    _reseal(log_dir, path)
    with pytest.raises(dvemb.HeaderMismatchError, match=r"grad\.0.*claims shape"):
        _read_all(log_dir)


def test_pickle_renamed_as_shard(log_dir: Path) -> None:
    _train(log_dir)
    path = _shard(log_dir)
    path.write_bytes(pickle.dumps({"grad.0": [1.0, 2.0]}))  # never unpickled: recognised as not safetensors
    _reseal(log_dir, path)
    with pytest.raises(dvemb.NotSafetensorsError, match="not a safetensors file"):
        _read_all(log_dir)


def test_missing_shard_and_step_gap(log_dir: Path) -> None:
    _train(log_dir)
    entries = _index(log_dir)
    _write_index(log_dir, [entries[0], entries[2]])
    with pytest.raises(dvemb.LogFormatError, match="line 2 lists 'shard-r0-000002.safetensors' where 'shard-r0-000001"):
        dvemb.open_log(log_dir)
    entries[1].update(first_step=3, last_step=3)
    _write_index(log_dir, entries)
    with pytest.raises(dvemb.StepContinuityError, match="expected it to start at 2"):
        dvemb.open_log(log_dir)


def test_not_a_log(tmp_path: Path) -> None:
    with pytest.raises(dvemb.LogFormatError, match="not a dvemb gradient log"):
        dvemb.open_log(tmp_path)


_WRITER = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F, dvemb
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, sys.argv[1], proj_dim=None, shard_steps=3)
    step = 0
    while True:
        with rec.step([4 * step + i for i in range(4)], optimizer):
            F.cross_entropy(model(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
            optimizer.step(); optimizer.zero_grad()
        step += 1
        if step == 7:
            print("ready", flush=True)
    """
)


def test_killed_writer_leaves_a_readable_prefix(log_dir: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", _WRITER, str(log_dir)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)  # keep writing shards, then die mid-run without any clean-up
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    log = dvemb.open_log(log_dir)
    log.validate()
    assert not log.complete and log.num_steps >= 6 and log.num_steps % 3 == 0
    assert log.manifest["optimizer"]["type"] == "SGD"  # run-level fields set at the first step reached the disk
    assert log.end_note().startswith("incomplete log: recording stopped after the last complete shard")
    assert f"steps 0 to {log.num_steps - 1}" in log.end_note()


def _record_through_write_failures(log_dir: Path, steps: int) -> int:
    """Record ``steps`` one-row steps in shards of two, going on after the OSErrors a step raises; their count."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = dvemb.Recorder(model, log_dir, shard_steps=2)
    failures = 0
    for step in range(steps):
        try:
            with rec.step([step], optimizer):
                F.cross_entropy(model(torch.randn(1, 6)), torch.tensor([0])).backward()
                optimizer.step()
                optimizer.zero_grad()
        except OSError:
            failures += 1
    rec.close()
    return failures


def test_a_failed_shard_write_keeps_its_steps(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If writing one shard fails, the steps buffered after it are not lost: the log stays continuous."""
    from dvemb.writer import LogWriter

    original = LogWriter._write_shard_now
    calls = {"n": 0}

    def flaky(self: LogWriter, records: list) -> None:  # type: ignore[type-arg]
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full (simulated)")
        original(self, records)

    monkeypatch.setattr(LogWriter, "_write_shard_now", flaky)
    failures = _record_through_write_failures(log_dir, 6)
    log = dvemb.open_log(log_dir)
    log.validate()
    assert failures == 1
    assert log.num_steps == 6  # the failed shard's steps were retried with the next one: nothing lost, no gap


def test_a_header_listing_many_tensors_is_refused_before_loading(log_dir: Path) -> None:
    """Issue 13, item 11: a shard whose header lists a hundred thousand empty tensors is refused from its header."""
    _train(log_dir)
    path = _shard(log_dir)
    tensors = load_file(str(path))
    tensors.update({f"pad{i}": torch.zeros(0) for i in range(100_000)})
    save_file(tensors, str(path), metadata={"format": "dvemb-gradient-log"})
    _reseal(log_dir, path)
    with pytest.raises(dvemb.HeaderMismatchError, match="a header of .* bytes; files of this log have headers"):
        _read_all(log_dir)


def test_a_manifest_with_nan_or_over_the_size_limit_is_refused(log_dir: Path) -> None:
    """Issue 13, items 2 and 4: NaN is not JSON (Postgres refused it and the file stayed 'validating'), and a
    manifest of tens of megabytes was stored and re-parsed on every request."""
    _train(log_dir)
    text = (log_dir / "manifest.json").read_text()
    (log_dir / "manifest.json").write_text(text.replace('"num_steps": 6', '"num_steps": NaN'))
    with pytest.raises(dvemb.LogFormatError, match="NaN is not a JSON value"):
        dvemb.open_log(log_dir)
    manifest = json.loads(text)
    manifest["model"] = "x" * (17 << 20)
    (log_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dvemb.LogFormatError, match="a manifest holds at most 16777216 bytes"):
        dvemb.open_log(log_dir)


# -- version 3: the shard index ----------------------------------------------------------------------


def _bytes_written() -> int:
    """Bytes this process has passed to write() so far, all threads (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _metadata_bytes_written(log_dir: Path, shards: int) -> tuple[int, int]:
    """(bytes written for everything but shards while recording ``shards`` one-step shards, manifest size)."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = _bytes_written()
    rec = dvemb.Recorder(model, log_dir, proj_dim=4, shard_steps=1, projection="random")
    for step in range(shards):
        with rec.step([step], optimizer):
            F.cross_entropy(model(torch.randn(1, 6)), torch.tensor([step % 3])).backward()
            optimizer.step()
            optimizer.zero_grad()
    rec.close()
    written = _bytes_written() - before
    shard_bytes = sum(p.stat().st_size for p in log_dir.glob("shard-r0-*.safetensors"))
    return written - shard_bytes, (log_dir / "manifest.json").stat().st_size


def test_the_metadata_written_per_shard_does_not_grow_with_the_run(tmp_path: Path) -> None:
    """Issue 14, item 5: version 2 rewrote the whole manifest, with every shard listed, after every shard:
    about 3.4 MB for 160 shards here and quadratic in the run's length. Version 3 appends one index line."""
    short, manifest_bytes = _metadata_bytes_written(tmp_path / "short", 40)
    long, _ = _metadata_bytes_written(tmp_path / "long", 160)
    index_bytes = (tmp_path / "long" / "shards.jsonl").stat().st_size
    assert index_bytes < 300 * 160  # one line of about 200 bytes per shard
    # A few manifest writes (open, the first step's run-level fields, close) and the index: linear.
    assert long < index_bytes + 5 * manifest_bytes, (long, index_bytes, manifest_bytes)
    assert long < 4.5 * short, (short, long)  # quadratic growth would be about 10x for 4x the shards


def _reopen_as_incomplete(log_dir: Path) -> None:
    """The manifest as it is while recording: not complete, the index not sealed."""
    manifest = json.loads((log_dir / "manifest.json").read_text())
    manifest.update(complete=False, shard_index={"file": "shards.jsonl"})
    (log_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("tail", [b'{"file":"shard-r0-000003.safetensors","first_st', b"\x00" * 40])
def test_a_partial_index_record_left_by_a_crash_is_dropped(log_dir: Path, tail: bytes) -> None:
    """A crash mid-append leaves a partial last line (or file-system zero fill): the log ends at the last
    complete record, and says so."""
    _train(log_dir)
    _reopen_as_incomplete(log_dir)
    index = log_dir / "shards.jsonl"
    index.write_bytes(index.read_bytes() + tail)
    log = dvemb.open_log(log_dir)
    log.validate()
    assert not log.complete and log.num_steps == 6 and log.num_shards() == 3
    assert f"a partial record of {len(tail)} bytes at the end of the shard index" in log.end_note()
    # Cut inside the last complete record: that shard is no longer part of the log.
    data = index.read_bytes()
    index.write_bytes(data[: data.rindex(b"\n", 0, len(data) - len(tail)) - 20])
    shorter = dvemb.open_log(log_dir)
    assert shorter.num_steps == 4 and shorter.num_shards() == 2 and list(shorter.iter_shards())
    assert shorter.digest() != log.digest()  # the manifest is the same: its bytes alone would not tell
    log = shorter
    assert log.end_note().startswith("incomplete log: recording stopped after the last complete shard")


def test_a_closed_logs_truncated_or_changed_index_is_refused(log_dir: Path) -> None:
    """A complete log's manifest seals the index: a truncated one never reads as a shorter complete log."""
    _train(log_dir)
    index = log_dir / "shards.jsonl"
    data = index.read_bytes()
    index.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 1])  # the last record removed, cleanly
    with pytest.raises(dvemb.TruncatedFileError, match=r"shards\.jsonl.*truncated or changed after recording"):
        dvemb.open_log(log_dir)
    index.write_bytes(data.replace(b'"num_rows":8', b'"num_rows":9', 1))  # same size, other bytes
    with pytest.raises(dvemb.ChecksumError, match=r"shards\.jsonl.*the index is corrupt"):
        dvemb.open_log(log_dir)


def test_a_corrupt_line_inside_the_index_is_refused(log_dir: Path) -> None:
    _train(log_dir)
    _reopen_as_incomplete(log_dir)
    index = log_dir / "shards.jsonl"
    lines = index.read_bytes().split(b"\n")
    lines[1] = b"#" + lines[1][1:]  # not JSON any more
    index.write_bytes(b"\n".join(lines))
    with pytest.raises(dvemb.LogFormatError, match=r"shards\.jsonl: line 2 is not a shard record"):
        dvemb.open_log(log_dir)


def test_a_failed_index_append_is_cut_before_the_retry(log_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half way (disk full) leaves half a record; the retried shard's record replaces it."""
    import dvemb.writer

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def half_then_fail(fd: int, data: bytes, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second shard's record
            real_pwrite(fd, data[: len(data) // 2], offset)
            raise OSError("disk full (simulated)")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(dvemb.writer.os, "pwrite", half_then_fail)
    failures = _record_through_write_failures(log_dir, 8)
    log = dvemb.open_log(log_dir)
    log.validate()
    assert failures == 1 and log.complete and log.num_steps == 8
    assert len((log_dir / "shards.jsonl").read_text().splitlines()) == log.num_shards()


_VERSION_2_LOG = Path(__file__).parent / "data" / "log_v2"  # written by dvemb at commit e300f16 (format version 2)


def test_a_version_2_log_still_reads(tmp_path: Path) -> None:
    """Logs recorded (and uploaded) before version 3 list their shards in the manifest; they still read."""
    log = dvemb.open_log(_VERSION_2_LOG)
    log.validate()
    assert log.manifest["version"] == 2 and log.complete and log.num_steps == 6 and log.num_shards() == 3
    assert log.end_note() == "complete log of 6 steps" and log.propagation == "momentum"
    assert log.read_shard(1).example_ids == list(range(8, 16)) and "opt.momentum" in log.read_shard(2).optimizer
    assert log.load_query_set("validation").texts == ["a", "b", "c"]
    names = formats.listed_files([json.loads((_VERSION_2_LOG / "manifest.json").read_text())])
    assert sorted(names) == sorted(p.name for p in _VERSION_2_LOG.iterdir())
    damaged = tmp_path / "log_v2"
    damaged.mkdir()
    for path in _VERSION_2_LOG.iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((damaged / "manifest.json").read_text())
    del manifest["shards"][1]
    (damaged / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(dvemb.StepContinuityError, match="expected it to start at 2"):
        dvemb.open_log(damaged)


def test_corruption_that_breaks_a_check_is_reported_as_corruption(log_dir: Path) -> None:
    """The checksum is verified in the same read as the tensors: when a flipped bit makes a gradient NaN,
    the shard is refused as corrupt (the cause), not as holding NaN (the symptom)."""
    _train(log_dir)
    path = _shard(log_dir)
    data = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    begin = 8 + n + json.loads(data[8 : 8 + n])["grad.0"]["data_offsets"][0]
    data[begin : begin + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(dvemb.ChecksumError, match=rf"{path.name}.*sha256.*corrupt"):
        dvemb.open_log(log_dir).read_shard(1)


@pytest.mark.parametrize(
    ("ids", "texts", "message"),
    [
        ([0, 1], ["fine", "a\u202eb"], "U\\+202E"),
        ([0, 1], ["nul\x00", "fine"], "U\\+0000"),
        (["ok", "bad\nid"], None, "control character"),
        ([-1], None, "0 or more"),
    ],
)
def test_describe_refuses_what_the_validator_would_refuse_when_it_is_called(
    tmp_path: Path, ids: list[object], texts: list[str] | None, message: str
) -> None:
    """An unsafe text or id is refused by rec.describe itself (before, the log was written and then refused whole
    at upload), and the log holds none of that call's records."""
    rec = dvemb.Recorder(mlp(), tmp_path / "log", proj_dim=4)
    with pytest.raises(dvemb.ConfigError, match=message):
        rec.describe(ids, texts=texts)
    rec.describe([5], texts=["kept"])
    rec.close()
    assert [r["id"] for r in dvemb.open_log(tmp_path / "log").iter_examples()] == [5]


def test_compute_refuses_an_out_that_is_a_file(log_dir: Path, tmp_path: Path) -> None:
    from dvemb.engine import compute

    _train(log_dir)
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    with pytest.raises(dvemb.ConfigError, match="is a file: give a directory"):
        compute(log_dir, target)
    assert target.read_text() == "keep me"
