"""A job's options reach the engine: every option the API accepts is a ``ComputeArguments`` field (none is
silently dropped by the worker's mapping), a value left out takes the engine's default, and the lifted second
moment can be turned off or forced per job (docs/optimizers.md section 3)."""

from __future__ import annotations

import dataclasses

from dvemb.engine import ComputeArguments
from server.api.schemas import JobCreate
from worker.computation import compute_arguments


def test_every_job_option_is_an_engine_argument() -> None:
    engine = {f.name for f in dataclasses.fields(ComputeArguments)}
    assert set(JobCreate.model_fields) <= engine, set(JobCreate.model_fields) - engine


def test_options_left_out_take_the_engines_defaults_and_given_ones_pass() -> None:
    default = compute_arguments(JobCreate().model_dump(exclude_none=True))
    assert default.second_moment_lifted is None
    assert default.blocks == ComputeArguments().blocks
    for value in (True, False):
        stored = JobCreate(second_moment_lifted=value, blocks="layer").model_dump(exclude_none=True)
        args = compute_arguments(stored)
        assert args.second_moment_lifted is value
        assert args.blocks == "layer"
