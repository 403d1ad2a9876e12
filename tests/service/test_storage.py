"""The storage interface (server/storage) on both implementations: a local directory and an S3-compatible bucket
served by a real server process (moto's standalone server, over HTTP). Each test runs on both and says the same."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import obstore
import pytest
from service_harness import S3Server

from server.storage import LocalStorage, Storage, open_storage
from server.storage.objects import ObjectStorage


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Storage]:
    if request.param == "local":
        yield open_storage(None, directory=tmp_path / "storage", scratch=tmp_path / "scratch", cache_bytes=1 << 30)
        return
    server: S3Server = request.getfixturevalue("s3_server")
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    bucket = server.bucket(f"t-{uuid.uuid4().hex[:12]}")
    yield open_storage(
        f"s3://{bucket}/some/prefix", directory=tmp_path / "unused", scratch=tmp_path / "scratch", cache_bytes=1 << 30
    )


def test_objects_listing_and_prefix_boundaries(storage: Storage, tmp_path: Path) -> None:
    storage.write_bytes("runs/1/log/manifest.json", b"{}")
    storage.write_bytes("runs/10/log/manifest.json", b"[]")
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(6 << 20) + b"end")  # over obstore's 5 MiB: a multipart upload
    storage.put_file("runs/1/log/shard-r0-000000.safetensors", source)
    assert storage.keys("runs/1") == ["runs/1/log/manifest.json", "runs/1/log/shard-r0-000000.safetensors"]
    assert storage.read_bytes("runs/1/log/shard-r0-000000.safetensors") == source.read_bytes()
    assert storage.local_file("runs/10/log/manifest.json").read_bytes() == b"[]"
    assert storage.exists("runs/1/log/manifest.json") and not storage.exists("runs/1/log/nothing")
    with pytest.raises(FileNotFoundError):
        storage.local_file("runs/1/log/nothing")
    storage.delete_prefix("runs/1")  # runs/10 is another run
    assert storage.keys("runs/1") == [] and storage.keys("runs/10") == ["runs/10/log/manifest.json"]
    storage.delete("runs/10/log/manifest.json")
    storage.delete("runs/10/log/manifest.json")  # twice: nothing to do
    assert storage.keys("runs") == []


def test_a_stale_cached_copy_is_fetched_again(storage: Storage) -> None:
    """Run ids restart when a database is reset: a cached copy of an object since replaced is not served."""
    storage.write_bytes("runs/1/results/1/summary.json", b'{"a": 1}')
    assert storage.local_file("runs/1/results/1/summary.json").read_bytes() == b'{"a": 1}'
    storage.write_bytes("runs/1/results/1/summary.json", b'{"b": 22}')
    assert storage.local_file("runs/1/results/1/summary.json").read_bytes() == b'{"b": 22}'
    with storage.local_copy("runs/1/results/1") as folder:
        assert (folder / "summary.json").read_bytes() == b'{"b": 22}'


def test_local_copy_filters_and_nests(storage: Storage) -> None:
    storage.write_bytes("runs/2/staging/manifest.json", b"m")
    storage.write_bytes("runs/2/staging/shards.jsonl", b"s")
    storage.create_part(2, "abc")
    with storage.local_copy("runs/2/staging", keep=lambda name: name.endswith((".json", ".jsonl"))) as folder:
        assert (folder / "manifest.json").read_bytes() == b"m" and (folder / "shards.jsonl").read_bytes() == b"s"
    storage.write_bytes("runs/2/results/5/adhoc/1.npy", b"q")
    with storage.local_copy("runs/2/results/5") as folder:
        assert (folder / "adhoc" / "1.npy").read_bytes() == b"q"


def _upload(storage: Storage, run_id: int, upload_id: str, pieces: list[tuple[int, bytes]]) -> None:
    """PATCH requests, each (offset, bytes), each flushed at its end (as the API does)."""
    for offset, data in pieces:
        with storage.open_part(run_id, upload_id) as part:
            part.start(offset)
            part.write(data[: len(data) // 2])
            part.write(data[len(data) // 2 :])
            part.flush()


def test_a_resumed_upload_is_received_whole_and_published(storage: Storage) -> None:
    data = os.urandom(3000)
    storage.create_part(3, "up1")
    # A request that stored 1000 bytes past the committed offset 1200 and died before committing them: the next
    # request starts again at 1200 and those bytes are dropped.
    _upload(storage, 3, "up1", [(0, data[:1200]), (1200, b"x" * 1000), (1200, data[1200:2500]), (2500, data[2500:])])
    with storage.received(3, "up1", "shard-r0-000000.safetensors") as local:
        assert local.read_bytes() == data
        storage.publish(3, "up1", "shard-r0-000000.safetensors", local)
    assert storage.keys("runs/3") == ["runs/3/log/shard-r0-000000.safetensors"]  # the part is gone
    assert storage.read_bytes("runs/3/log/shard-r0-000000.safetensors") == data
    with pytest.raises(FileNotFoundError):
        storage.open_part(3, "up1")  # handed over: nothing to append to
    # A validator that died after publishing: the bytes are found in the log; a rejection deletes them there.
    with storage.received(3, "up1", "shard-r0-000000.safetensors") as local:
        assert local.read_bytes() == data
    storage.discard(3, "up1", "shard-r0-000000.safetensors")
    assert storage.keys("runs/3") == []


def test_one_writer_per_upload_and_a_discarded_part_leaves_nothing(storage: Storage) -> None:
    from server.storage import PartBusy

    storage.create_part(4, "up2")
    with storage.open_part(4, "up2") as part:
        with pytest.raises(PartBusy):
            storage.open_part(4, "up2")
        part.start(0)
        part.write(b"abc")
        part.flush()
    storage.discard(4, "up2", "manifest.json")
    assert storage.keys("runs/4") == []
    storage.create_part(4, "up3")
    storage.delete_part(4, "up3")
    assert storage.keys("runs/4") == []
    with pytest.raises(FileNotFoundError):
        storage.open_part(4, "up3")


def test_results_computed_in_a_workdir_are_saved(storage: Storage) -> None:
    work = storage.results_workdir(5, 7)
    (work / "segments").mkdir(parents=True)
    (work / "summary.json").write_text("{}")
    (work / "segments" / "plan.json").write_text("[]")
    storage.save_results(5, 7, work)
    storage.release_workdir(5, 7)
    assert storage.keys("runs/5/results/7") == ["runs/5/results/7/segments/plan.json", "runs/5/results/7/summary.json"]


def test_messages_name_files_not_machines(storage: Storage) -> None:
    for folder in storage.private_dirs:
        assert storage.public_message(f"cannot read {folder}/runs/1/log/x.safetensors: bad") == (
            "cannot read x.safetensors: bad"
        )


def test_the_cache_stays_under_its_limit_and_copies_in_use_survive(
    s3_server: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    bucket = s3_server.bucket(f"t-{uuid.uuid4().hex[:12]}")
    storage = ObjectStorage(f"s3://{bucket}", tmp_path / "scratch", cache_bytes=2500)
    for i in range(4):
        storage.write_bytes(f"runs/1/log/f{i}", bytes([i]) * 1000)
    with storage.local_copy("runs/1/log", keep=lambda name: name in ("f0", "f1")) as view:
        for i in (2, 3):  # two more files: the least recently used copies (f0, f1) make room
            storage.local_file(f"runs/1/log/f{i}")
        cached = [p for p in (tmp_path / "scratch" / "cache" / "data").rglob("*") if p.is_file()]
        assert sum(p.stat().st_size for p in cached) <= 2500
        assert {p.name for p in cached} == {"f2", "f3"}
        assert (view / "f0").read_bytes() == b"\0" * 1000  # the view's links outlive the eviction
    assert not view.exists()
    # The bucket is the truth: evicted copies are fetched again.
    assert storage.local_file("runs/1/log/f0").read_bytes() == b"\0" * 1000
    assert obstore.head(storage.store, "runs/1/log/f0")["size"] == 1000


def test_storage_urls() -> None:
    assert isinstance(
        open_storage("file:///tmp/x", directory=Path("y"), scratch=Path("z"), cache_bytes=1), LocalStorage
    )
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        open_storage("ftp://host/x", directory=Path("y"), scratch=Path("z"), cache_bytes=1)
