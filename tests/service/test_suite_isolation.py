"""Two copies of the suite on one machine flush and use different Redis databases (issue 26)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis
from service_harness import _CLAIM, REDIS_DB


def test_a_second_suite_claims_another_redis_database_and_gives_it_back() -> None:
    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "DVEMB_TEST_REDIS_DB"}
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parents[1])])
    code = "import os, service_harness as h; print(h.REDIS_DB, os.environ['DVEMB_TEST_REDIS_DB'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=120)
    theirs, exported = (int(v) for v in out.stdout.split())
    assert theirs == exported and theirs != REDIS_DB
    assert redis.Redis(host="127.0.0.1", port=6379, db=0).get(_CLAIM.format(theirs)) is None  # released at exit
    assert redis.Redis(host="127.0.0.1", port=6379, db=0).get(_CLAIM.format(REDIS_DB)) is not None  # ours is held
