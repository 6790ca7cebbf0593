"""Property-based: schemathesis drives every operation of the server's own OpenAPI schema
with generated (valid and invalid) requests; none may get a 5xx.

The server has a 64-token context so any generated request finishes quickly; examples are
bounded per operation and Hypothesis does not shrink (a failure is reported as found).
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from tests.server.conftest import ServerProcess, wait_idle

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def api_schema(small_server: ServerProcess) -> Any:
    config = schemathesis.Config.from_dict(
        {
            "generation": {"max-examples": MAX_EXAMPLES},
        }
    )
    return schemathesis.openapi.from_url(
        f"{small_server.base_url}/openapi.json", config=config, timeout=30
    )


# Every operation the server's schema has (test_schema_lists_these_operations keeps it honest).
OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
]
# Operations without inputs have no invalid requests to generate.
CASES = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]


def test_schema_lists_these_operations(api_schema: Any) -> None:
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert labels == {f"{m} {p}" for m, p in OPERATIONS}


# schemathesis' own pytest integration (schemathesis.pytest.from_fixture + parametrize) fails on
# pytest 9 (it reads the removed Function._nodeid), so each operation's strategy is driven by
# Hypothesis directly.
@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), CASES, ids=lambda v: getattr(v, "value", v))
def test_no_server_errors(
    api_schema: Any, small_server: ServerProcess, method: str, path: str, mode: GenerationMode
) -> None:
    operation = api_schema[path][method]

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report what was found
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        response = case.call(base_url=small_server.base_url, timeout=60)
        case.validate_response(response, checks=[not_a_server_error])

    check()


def test_small_server_ends_idle(small_server: ServerProcess) -> None:
    """After the fuzzing nothing is left running or holding KV blocks."""
    wait_idle(small_server, timeout=5.0)
