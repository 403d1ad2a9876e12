"""Every test falls in exactly one tier, from where it lives and what it uses (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.tiers import HERE, tier_of


def test_tiers_follow_the_directory_and_the_browser_fixture() -> None:
    assert tier_of(HERE / "core" / "test_engine.py", ["tmp_path"]) == "core"
    assert tier_of(HERE / "integrations" / "test_huggingface.py", ["tmp_path"]) == "core"
    assert tier_of(HERE / "test_examples.py", ["tmp_path"]) == "core"
    assert tier_of(HERE / "service" / "test_jobs.py", ["api", "tmp_path"]) == "service"
    assert tier_of(HERE / "test_demo.py", ["tmp_path"]) == "service"
    assert tier_of(HERE / "service" / "test_dashboard.py", ["browser", "api"]) == "browser"
    assert tier_of(Path(str(HERE / "core" / "x.py")), []) == "core"
