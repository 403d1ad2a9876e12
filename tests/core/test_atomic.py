"""The atomic-write helper: a complete write replaces the file; a failed one leaves the old file and no
temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from dvemb.atomic import replacing, write_bytes_atomic, write_text_atomic


@pytest.mark.parametrize("unique", [False, True])
def test_a_complete_write_replaces_and_a_failed_one_leaves_the_old_file(tmp_path: Path, unique: bool) -> None:
    target = tmp_path / "plan.json"
    write_text_atomic(target, "old", unique=unique)
    assert target.read_text() == "old"
    with pytest.raises(RuntimeError, match="mid-write"), replacing(target, unique=unique) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # no temporary left
    assert write_bytes_atomic(target, b"new", unique=unique) == target
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize("durable", [False, True])
def test_a_durable_write_fsyncs_the_file_before_the_rename_and_the_directory_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durable: bool
) -> None:
    """The gradient log's writer survives a crash of the machine: its files are fsynced, then their directory."""
    import os

    target = tmp_path / "manifest.json"
    synced: list[tuple[str, bool]] = []
    fsync = os.fsync

    def recorded(fd: int) -> None:
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name if Path("/proc/self/fd").exists() else "?"
        synced.append((name, target.exists()))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recorded)
    write_text_atomic(target, "{}", durable=durable)
    assert target.read_text() == "{}"
    if not durable:
        assert synced == []
    elif Path("/proc/self/fd").exists():
        assert synced == [(".manifest.json.tmp", False), (tmp_path.name, True)]
    else:
        assert [exists for _, exists in synced] == [False, True]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
