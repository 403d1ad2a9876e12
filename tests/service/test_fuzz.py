"""Property-based fuzzing of the whole API from its OpenAPI schema (schemathesis strategies, hypothesis, the
running server with a valid token): no answer is a 500, and every JSON error has the {"error", "detail"}
shape (issue 13)."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from service_harness import Api

pytestmark = pytest.mark.slow
EXAMPLES_PER_OPERATION = 20


def test_no_server_error_and_one_error_shape(api: Api) -> None:
    schema = schemathesis.openapi.from_url(f"{api.url}/api/v1/openapi.json")
    auth = {"Authorization": api.client.headers["Authorization"]}
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 20  # the whole API, not an empty schema
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            response = case.call(base_url=api.url, headers=auth, timeout=30)
            where = f"{case.method} {case.formatted_path} -> {response.status_code}"
            if response.status_code >= 500:
                failures.append(f"{where}: {response.text[:200]}")
            elif (
                response.status_code >= 400
                and case.method != "HEAD"  # a HEAD answer has the headers of its GET and no body
                and "application/json" in str(response.headers.get("content-type"))
            ):
                body = response.json()
                if not (isinstance(body, dict) and set(body) == {"error", "detail"}):
                    failures.append(f"{where}: error shape {str(body)[:200]}")

        check()
    assert not failures, "\n".join(failures[:20])
