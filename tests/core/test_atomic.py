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
