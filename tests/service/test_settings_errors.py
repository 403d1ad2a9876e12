"""A bad service setting is refused at start-up in one line that names the DVEMB_* variable, the value found and
what is expected (pydantic's own message names a Python field), from the library, `dvemb serve` and `dvemb worker`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.settings import SettingsError, get_settings


def test_get_settings_names_each_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVEMB_DATABASE_POOL_SIZE", "0")
    monkeypatch.setenv("DVEMB_READ_TIMEOUT_SECONDS", "soon")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as raised:
            get_settings()
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    message = str(raised.value)
    assert "DVEMB_DATABASE_POOL_SIZE='0': input should be greater than or equal to 1" in message
    assert "DVEMB_READ_TIMEOUT_SECONDS='soon': input should be a valid number" in message
    assert message.endswith("(docs/service.md lists the settings)") and "\n" not in message


@pytest.mark.parametrize("command", [["serve", "--no-worker", "--port", "0"], ["worker"]])
def test_the_commands_refuse_a_bad_setting_in_one_line(tmp_path: Path, command: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVEMB_")}
    env.update(DVEMB_DATA_DIR=str(tmp_path), DVEMB_DATABASE_MAX_OVERFLOW="-1")
    done = subprocess.run(
        [sys.executable, "-m", "dvemb.cli", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "dvemb: error: DVEMB_DATABASE_MAX_OVERFLOW='-1': input should be greater than or equal to 0 "
        "(docs/service.md lists the settings)"
    ]
    assert not (tmp_path / "dvemb.db").exists()  # nothing was made
