"""The recorder's modes (dvemb.recording.modes): enums that take the strings users pass, refused with the choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from core_models import mlp

import dvemb
from dvemb import logformat as fmt
from dvemb.recording.modes import CurvatureMode, ProjectionMode, StorageDtype, choose


def test_a_mode_is_its_string() -> None:
    mode = choose(CurvatureMode, "curvature", "ggn")
    assert mode is CurvatureMode.GGN and mode == "ggn" and f"{mode}" == "ggn"
    assert choose(ProjectionMode, "projection", ProjectionMode.RANDOM) is ProjectionMode.RANDOM


@pytest.mark.parametrize("value", ["fisher", None, 3, ["ggn"]])
def test_anything_else_is_refused_with_the_choices_in_order(value: object) -> None:
    with pytest.raises(dvemb.ConfigError) as caught:
        choose(CurvatureMode, "curvature", value)  # type: ignore[arg-type]
    assert str(caught.value) == f"curvature={value!r} is not one of 'empirical', 'ggn'"


def test_the_storage_dtypes_are_the_log_formats() -> None:
    assert [d.value for d in StorageDtype] == list(fmt.STORAGE_DTYPES)


def test_the_recorder_keeps_the_strings_it_was_given(log_dir: Path) -> None:
    rec = dvemb.Recorder(mlp(), log_dir, curvature="empirical", projection="random", loss_reduction="sum")
    assert (rec.curvature_mode, rec.projection_mode, rec.loss_reduction) == ("empirical", "random", "sum")
    rec.close()
    assert dvemb.open_log(log_dir).curvature_mode == "empirical"
    assert '"loss_reduction": "sum"' in (log_dir / "manifest.json").read_text()
