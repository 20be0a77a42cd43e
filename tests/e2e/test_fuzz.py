"""Property-based fuzzing of the running server from its OpenAPI document, and a short coverage-guided run.

Longer runs are described in docs/RELIABILITY.md.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import schemathesis
from helpers import HALF_PLUS_TWO, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import export_kitchen
from schemathesis.checks import not_a_server_error

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_PER_OPERATION = int(os.environ.get("PYSERVING_FUZZ_EXAMPLES", "40"))


@pytest.fixture(scope="module")
def fuzzed_server(start_server, tmp_path_factory):
    """half_plus_two and the kitchen model (several inputs, strings, ints, bools) in one server."""
    kitchen = export_kitchen(tmp_path_factory.mktemp("kitchen") / "kitchen")
    config = write_config(
        tmp_path_factory.mktemp("config") / "models.config",
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "kitchen", "path": kitchen},
    )
    return start_server(f"--model_config_file={config}", "--rest_api_timeout_in_ms=5000")


def test_no_request_the_schema_allows_gets_a_server_error(fuzzed_server):
    """Requests generated from the OpenAPI document, for every operation: never a 5xx or a dropped connection.

    (schemathesis's pytest plugin does not run under pytest 9, so the operations are driven here.)
    """
    schema = schemathesis.openapi.from_url(fuzzed_server.rest + "/openapi.yaml")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 29
    statuses: dict[int, int] = {}
    for operation in operations:
        # Half the cases go to the served models (random names would mostly meet a 404).
        @given(case=operation.as_strategy(), model=st.sampled_from([None, "half_plus_two", "kitchen"]))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case, model):
            if model is not None and "model_name" in (case.path_parameters or {}):
                case.path_parameters["model_name"] = model
                if "version" in case.path_parameters:
                    case.path_parameters["version"] = "123" if model == "half_plus_two" else "1"
                if "model_version" in case.path_parameters:
                    case.path_parameters["model_version"] = "123" if model == "half_plus_two" else "1"
            response = case.call(base_url=fuzzed_server.rest, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

        check()
    print(f"\nschemathesis: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= len(operations) * 10
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0
    assert fuzzed_server.proc.poll() is None


def test_openapi_document_is_served_and_names_every_route(fuzzed_server):
    r = requests.get(fuzzed_server.rest + "/openapi.yaml", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/yaml"
    assert r.content == (REPO / "src" / "pyserving" / "protocols" / "openapi.yaml").read_bytes()
    for route in (
        "/v1/models/{model_name}:predict:",
        "/v1/models/{model_name}/labels/{label}:classify:",
        "/v1/models/{model_name}/versions/{version}/metadata:",
        "/readyz:",
        "/v2/models/{model_name}/versions/{model_version}/infer:",
        "/v2/repository/models/{model_name}/unload:",
    ):
        assert f"\n  {route}\n" in r.text


def test_decoder_fuzz_target_short_run(tmp_path):
    """The atheris target over a copy of the seed corpus: 20,000 inputs without an unexpected exception."""
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "fuzz" / "corpus", corpus)
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "fuzz" / "fuzz_decoders.py"),
            "-runs=20000",
            "-seed=1",
            f"-artifact_prefix={tmp_path}/",
            str(corpus),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 20000 runs" in result.stderr
