"""REST API against TF Serving's documented answers, bytes included where clients can see them."""

import gzip
import json
import re

import pytest
import requests
from helpers import MODELS, post


def squash(text: str) -> str:
    return re.sub(r"\s", "", text)


@pytest.fixture(scope="module")
def url(half_plus_two):
    return half_plus_two.rest + "/v1/models/half_plus_two"


@pytest.mark.smoke
def test_seed_example(url):
    r = post(url + ":predict", '{"instances": [1.0, 2.0, 5.0]}')
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert squash(r.text) == '{"predictions":[2.5,3.0,4.5]}'
    assert r.content == b'{\n    "predictions": [2.5, 3.0, 4.5\n    ]\n}'


def test_row_format_2d(url):
    r = post(url + ":predict", {"instances": [[1.0], [2.0]]})
    assert r.content == b'{\n    "predictions": [[2.5], [3.0]\n    ]\n}'


def test_columnar_format(url):
    r = post(url + ":predict", {"inputs": [[2.0], [3.0], [4.0]]})
    assert r.status_code == 200
    assert r.json() == {"outputs": [[3.0], [3.5], [4.0]]}
    named = post(url + ":predict", {"inputs": {"x": [2.0, 3.0, 4.0]}})
    assert named.content == b'{\n    "outputs": [\n        3.0,\n        3.5,\n        4.0\n    ]\n}'


def test_signature_name_selects_signature(url):
    r = post(url + ":predict", {"signature_name": "regress_x2_to_y3", "instances": [[2.0]]})
    assert r.status_code == 200, r.text
    assert r.json() == {"predictions": [[4.0]]}


def test_version_paths(half_plus_two):
    for version in ("00000123", "123"):
        r = post(f"{half_plus_two.rest}/v1/models/half_plus_two/versions/{version}:predict", {"instances": [1.0]})
        assert r.json() == {"predictions": [2.5]}
    status = requests.get(f"{half_plus_two.rest}/v1/models/half_plus_two/versions/00000123")
    assert status.json()["model_version_status"][0]["version"] == "123"


def test_gzip_request_body(url):
    body = gzip.compress(b'{"instances": [1.0, 2.0, 5.0]}')
    r = post(url + ":predict", body, headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200
    assert r.json() == {"predictions": [2.5, 3.0, 4.5]}


def test_broken_gzip_is_an_empty_document(url):
    r = post(url + ":predict", b"not gzip at all", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    assert r.json() == {"error": "JSON Parse error: The document is empty"}


def test_nan_and_infinity_in_and_out(url):
    r = post(url + ":predict", '{"instances": [NaN, Infinity, -Infinity]}')
    assert r.status_code == 200
    assert r.content == b'{\n    "predictions": [NaN, Infinity, -Infinity\n    ]\n}'


def test_trailing_data_after_the_document_is_ignored(url):
    r = post(url + ":predict", '{"instances": [1.0]} trailing garbage')
    assert r.json() == {"predictions": [2.5]}


def test_status_json_exact(url):
    r = requests.get(url)
    assert r.status_code == 200
    assert r.text == (
        '{\n "model_version_status": [\n  {\n   "version": "123",\n   "state": "AVAILABLE",\n'
        '   "status": {\n    "error_code": "OK",\n    "error_message": ""\n   }\n  }\n ]\n}\n'
    )


def test_status_with_label_ignores_label(url):
    r = requests.get(url + "/labels/whatever")
    assert r.status_code == 200
    assert r.json()["model_version_status"][0]["state"] == "AVAILABLE"


@pytest.mark.smoke
def test_metadata_matches_tf_serving(url):
    r = requests.get(url + "/metadata")
    assert r.status_code == 200
    assert r.text.startswith(
        '{\n"model_spec":{\n "name": "half_plus_two",\n "signature_name": "",\n'
        ' "version": "123"\n}\n,\n"metadata": {"signature_def": {\n'
    )
    expected = json.loads((MODELS / "half_plus_two_model_metadata.json").read_text())
    expected["model_spec"]["name"] = "half_plus_two"
    assert r.json() == expected


@pytest.mark.parametrize(
    "method, path, body, status, message",
    [
        ("POST", "/v1/models/half:predict", {"instances": [1.0]}, 404, "Servable not found for request: Latest(half)"),
        (
            "POST",
            "/v1/models/half_plus_two/versions/50:predict",
            {"instances": [1.0]},
            404,
            "Servable not found for request: Specific(half_plus_two, 50)",
        ),
        ("GET", "/v1/models/half/metadata", None, 404, "Servable not found for request: Latest(half)"),
        ("GET", "/v1/models/half", None, 404, "Could not find any versions of model half"),
        ("GET", "/v1/models/half_plus_two/versions/7", None, 404, "Could not find version 7 of model half_plus_two"),
        (
            "POST",
            "/v1/models/half_plus_two/labels/canary:predict",
            {"instances": [1.0]},
            400,
            "Unrecognized servable version label: canary",
        ),
        (
            "GET",
            "/v1/models/half_plus_two/labels/canary/metadata",
            None,
            400,
            "Unrecognized servable version label: canary",
        ),
        ("POST", "/v1/models/half_plus_two:predict", b"", 400, "JSON Parse error: The document is empty"),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            b"{bad",
            400,
            "JSON Parse error: Missing a name for object member. at offset: 1",
        ),
        ("POST", "/v1/models/half_plus_two:predict", b"nope", 400, "JSON Parse error: Invalid value. at offset: 0"),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            b'{"instances": [1.0,',
            400,
            "JSON Parse error: Invalid value. at offset: 19",
        ),
        ("POST", "/v1/models/half_plus_two:predict", b"[1, 2]", 400, "JSON Value: [1, 2] Is not object"),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": [1.0], "signature_name": "foo"},
            400,
            'Serving signature name: "foo" not found in signature def',
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": [1.0], "signature_name": 5},
            400,
            'JSON Value: {\n    "instances": [1.0],\n    "signature_name": 5\n} not formatted '
            "correctly. 'signature_name' key must be a string value.",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": [1.0, "x"]},
            400,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: JSON Value: \"x\" "
            "Type: String is not of expected type: float",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": [[1.0], [1.0, 2.0]]},
            400,
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 1 "
            "but got: 2",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"inputs": [[1.0], 2.0]},
            400,
            "JSON Value: 2.0 found at incorrect level: 2 in the JSON DOM. Expected at level: 2",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"inputs": [[1.0], [1.0, 2.0]]},
            400,
            "Encountered list at unexpected size: 2 at level: 1 expected size: 1",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"inputs": [True]},
            400,
            "JSON Value: true Type: True is not of expected type: float",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": []},
            400,
            "JSON Value: {\n    \"instances\": []\n} No values in 'instances' array",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": 1.0},
            400,
            "JSON Value: {\n    \"instances\": 1.0\n} Expecting 'instances' to be an list/array",
        ),
        ("POST", "/v1/models/half_plus_two:predict", {"foo": 1}, 400, "Missing 'inputs' or 'instances' key"),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"instances": [1.0], "inputs": [1.0]},
            400,
            'JSON Value: {\n    "instances": [1.0],\n    "inputs": [1.0]\n} Not '
            "formatted correctly expecting only one of 'inputs' or 'instances' keys to exist ",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict",
            {"inputs": {"y": [1.0]}},
            400,
            "Missing named input: x in 'inputs' object.",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:PREDICT",
            {"instances": [1.0]},
            400,
            "Malformed request: POST /v1/models/half_plus_two:PREDICT",
        ),
        (
            "POST",
            "/v1/models/half_plus_two:predict?x=1",
            {"instances": [1.0]},
            400,
            "Malformed request: POST /v1/models/half_plus_two:predict?x=1",
        ),
        (
            "GET",
            "/v1/models/half_plus_two:predict",
            None,
            400,
            "Malformed request: GET /v1/models/half_plus_two:predict",
        ),
        ("PUT", "/v1/models/half_plus_two", b"{}", 400, "Malformed request: PUT /v1/models/half_plus_two"),
        (
            "GET",
            "/v1/models/half_plus_two/versions/abc",
            None,
            400,
            "Malformed request: GET /v1/models/half_plus_two/versions/abc",
        ),
        ("GET", "/v1/models", None, 400, "Missing model name in request."),
    ],
)
def test_errors(half_plus_two, method, path, body, status, message):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body)
    r = requests.request(method, half_plus_two.rest + path, data=data, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"error": message}
    assert r.content == b'{\n    "error": ' + json.dumps(message, ensure_ascii=False).encode() + b"\n}"


def test_shape_is_not_checked_against_the_signature(url):
    # x:0 is declared [-1, 1]; TF Serving feeds a [3] tensor anyway.
    assert post(url + ":predict", {"inputs": [1.0, 2.0]}).json() == {"outputs": [2.5, 3.0]}


def test_shape_error_from_the_model_is_400(half_plus_two):
    r = post(
        half_plus_two.rest + "/v1/models/half_plus_two:predict",
        {"signature_name": "regress_x2_to_y3", "inputs": [[[1.0]]]},
    )
    assert r.status_code in (200, 400)  # broadcasting may accept it; never a 5xx
    assert "error" in r.json() or "outputs" in r.json()


def test_version_overflow_is_400_with_empty_body(half_plus_two):
    r = requests.get(half_plus_two.rest + "/v1/models/half_plus_two/versions/99999999999999999999")
    assert r.status_code == 400
    assert r.content == b""


def test_non_v1_path_gets_libevent_404_page(half_plus_two):
    r = requests.get(half_plus_two.rest + "/healthz-not-here")
    assert r.status_code == 404
    assert r.text == "<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"


def test_cors_preflight(half_plus_two):
    ok = requests.options(
        half_plus_two.rest + "/v1/models/half_plus_two:predict", headers={"Origin": "https://example.com"}
    )
    assert (ok.status_code, ok.content) == (200, b"")
    missing = requests.options(half_plus_two.rest + "/v1/models/half_plus_two:predict")
    assert (missing.status_code, missing.content) == (400, b"")


def test_percent_encoded_model_name(half_plus_two):
    r = post(half_plus_two.rest + "/v1/models/half%5Fplus%5Ftwo:predict", {"instances": [1.0]})
    assert r.json() == {"predictions": [2.5]}
