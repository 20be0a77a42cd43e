"""REST tensor encoding on a model the test exports: several inputs/outputs, strings, b64, ints, bools."""

import base64
import math
import re

import numpy as np
import pytest
import requests
from helpers import post
from models import export_kitchen


@pytest.fixture(scope="module")
def kitchen(start_server, tmp_path_factory):
    base = export_kitchen(tmp_path_factory.mktemp("kitchen") / "kitchen")
    server = start_server("--model_name=kitchen", f"--model_base_path={base}")
    return server.rest + "/v1/models/kitchen:predict"


def test_multiple_inputs_and_outputs_row_format(kitchen):
    r = post(kitchen, {"instances": [{"a": 1.0, "b": 2.0}, {"a": 3.0, "b": 4.0}]})
    assert r.status_code == 200, r.text
    assert r.content == (
        b'{\n    "predictions": [\n        {\n            "product": 2.0,\n            "sum": 3.0\n'
        b'        },\n        {\n            "product": 12.0,\n            "sum": 7.0\n        }\n'
        b"    ]\n}"
    )


def test_multiple_inputs_columnar(kitchen):
    r = post(kitchen, {"inputs": {"a": [1.0, 3.0], "b": [2.0, 4.0]}})
    assert r.json() == {"outputs": {"product": [2.0, 12.0], "sum": [3.0, 7.0]}}


def test_instance_keys_must_match_inputs(kitchen):
    r = post(kitchen, {"instances": [{"a": 1.0}]})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "Failed to process element: 0 of 'instances' list. JSON object: {\n    \"a\": 1.0\n} keys must be equal to: a,b"
    )
    plain = post(kitchen, {"instances": [1.0]})
    assert plain.json()["error"] == (
        "instances is a plain list, but expecting list of objects as multiple input "
        "tensors required as per tensorinfo_map"
    )


def test_strings_b64_int64_bool(kitchen):
    body = {
        "signature_name": "types",
        "instances": [
            {"text": "héllo", "count": 2**40, "flag": True},
            {"text": {"b64": base64.b64encode(b"\x00\xffraw").decode()}, "count": -3, "flag": False},
        ],
    }
    r = post(kitchen, body)
    assert r.status_code == 200, r.text
    rows = r.json()["predictions"]
    assert rows[0]["text"] == "héllo"
    assert rows[0]["text_bytes"] == {"b64": base64.b64encode("héllo".encode()).decode()}
    assert rows[0]["count"] == 2**41
    assert '"count": 2199023255552' in r.text  # int64 stays an unquoted number
    assert rows[0]["flag"] is False and rows[1]["flag"] is True
    assert rows[0]["length"] == 6
    assert rows[1]["text_bytes"] == {"b64": base64.b64encode(b"\x00\xffraw").decode()}
    assert rows[1]["count"] == -6


def test_invalid_base64_is_rejected(kitchen):
    r = post(kitchen, {"signature_name": "types", "instances": [{"text": {"b64": "!!!"}, "count": 1, "flag": True}]})
    assert r.status_code == 400
    assert r.json()["error"] == (
        "Failed to process element: 0 key: text of 'instances' list. Error: INVALID_ARGUMENT: Unable to base64 decode"
    )


def test_surrogate_escapes_in_strings_as_tf_serving_reads_them(kitchen):
    """rapidjson refuses a lone high surrogate (was a 500 UnicodeEncodeError) and keeps a lone low one
    as its three UTF-8-style bytes."""
    row = b'{"text": "%s", "count": 1, "flag": true}'
    r = post(kitchen, b'{"signature_name": "types", "instances": [' + row % rb"\ud800" + b"]}")
    assert (r.status_code, r.json()) == (
        400,
        {"error": "JSON Parse error: The surrogate pair in string is invalid. at offset: 52"},
    )
    r = post(kitchen, b'{"signature_name": "types", "instances": [' + row % rb"\udc00\ud83d\ude00" + b"]}")
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["text_bytes"] == {
        "b64": base64.b64encode(b"\xed\xb0\x80\xf0\x9f\x98\x80").decode()
    }
    assert r.json()["predictions"][0]["length"] == 7


def test_int_input_rejects_fractions_and_bools(kitchen):
    r = post(kitchen, {"signature_name": "ints", "inputs": [1, 2.5]})
    assert r.json()["error"] == "JSON Value: 2.5 Type: Number is not of expected type: int32"
    assert post(kitchen, {"signature_name": "ints", "inputs": [1, 2]}).json() == {"outputs": [2, 3]}


def test_float_formatting_matches_tf_serving(kitchen):
    r = post(kitchen, {"signature_name": "floats", "inputs": [1.0, 3.0]})
    assert r.status_code == 200
    assert r.json() == {"outputs": {"scaled": [9e6, 2.7e7], "third": [0.333333343, 1.0], "tiny": [1e-05, 3e-05]}}
    text = r.text
    assert "0.333333343" in text and "9e+06" in text and "2.7e+07" in text and "1e-05" in text
    doubles = post(kitchen, {"signature_name": "doubles", "inputs": [1.0]})
    assert "0.33333333333333331" in doubles.text


def _tf_float(value: float) -> str:
    """TF Serving's text for a float32 value: %.6g if it reads back exactly, else %.9g; `.0` for integers."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    text = "%.6g" % value
    if np.float32(float(text)) != np.float32(value):
        text = "%.9g" % value
    return text if "." in text or "e" in text else text + ".0"


def test_large_float_outputs_format_like_tf_serving(kitchen):
    """Thousands of values take the vectorised formatter: every one must read as TF Serving writes it."""
    rng = np.random.default_rng(7)
    x = np.concatenate(
        [
            rng.standard_normal(1500),
            rng.uniform(-1e4, 1e4, 1500).round(2),
            [0.0, -0.0, 1.0, 0.1, 1e-4, 123456.0, 3.5e5, 111.111, 1e9 / 9e6],
        ]
    ).astype(np.float32)
    body = '{"signature_name": "floats", "inputs": [' + ",".join("%.9g" % v for v in x.tolist()) + "]}"
    r = requests.post(kitchen, data=body, timeout=60)
    assert r.status_code == 200, r.text
    expected = {"third": x / np.float32(3), "scaled": x * np.float32(9e6), "tiny": x * np.float32(1e-5)}
    for name, values in expected.items():
        run = re.search(rf'"{name}": \[\n(.*?)\n\s*\]', r.text, re.S).group(1)
        texts = [t.strip() for t in run.split(",")]
        got = np.array([float(t) for t in texts], np.float32)
        np.testing.assert_allclose(got, values, rtol=1e-6, atol=1e-30)  # TF's own float32 arithmetic
        assert texts == [_tf_float(v) for v in got.tolist()], name


def test_large_numeric_bodies_decode_like_small_ones(kitchen):
    """Bodies from 4 KiB up go through the numeric decoder (simdjson straight into numpy): regular arrays must
    give the same tensors, and whatever it declines the same errors, as small bodies do."""
    r = post(kitchen, {"signature_name": "ints", "inputs": [[i, -i] for i in range(1200)]})
    assert r.json() == {"outputs": [[i + 1, 1 - i] for i in range(1200)]}
    nested = np.arange(2 * 30 * 40, dtype=np.float32).reshape(2, 30, 40) / 8
    r = post(kitchen, {"signature_name": "floats", "instances": nested.tolist()})
    scaled = np.array([row["scaled"] for row in r.json()["predictions"]], np.float32)
    assert scaled.shape == (2, 30, 40) and np.array_equal(scaled, nested * np.float32(9e6))
    pad = [[5, 6]] * 1500
    for small in (
        [[1, 2], [3]],
        [[1, 2], [3, 4.5]],
        [[1, 2], [3, True]],
        [[1, 2], [3, None]],
        [[1, 2], [[3], 4]],
        [[1, 2], [3, "4"]],
    ):
        errors = [post(kitchen, {"signature_name": "ints", "inputs": body}).json() for body in (small, small + pad)]
        assert "error" in errors[0] and errors[1] == errors[0], small


def test_scalar_columnar_and_rank0_row_error(kitchen):
    assert post(kitchen, {"signature_name": "floats", "inputs": 3.0}).content == (
        b'{\n    "outputs": {\n        "scaled": 2.7e+07,\n        "third": 1.0,\n        "tiny": 3e-05\n    }\n}'
    )


def test_unsupported_output_dtype_is_400(kitchen):
    for body in ({"signature_name": "half", "inputs": [1.0]}, {"signature_name": "half", "instances": [1.0]}):
        r = post(kitchen, body)
        assert r.status_code == 400
        assert r.json() == {"error": "Failed to write JSON value for tensor type: half"}


@pytest.mark.parametrize(
    ("signature", "instances", "expected"),
    [
        ("ints", [1], b"[2"),
        ("ints", [1, 2, 3], b"[2, 3, 4"),
        ("ints", [[1]], b"[[2]"),
        ("ints", [[1, 2, 3], [4, 5, 6]], b"[[2, 3, 4], [5, 6, 7]"),
        ("ints", [[[1, 2], [3, 4]], [[5, 6], [7, 8]]], b"[[[2, 3], [4, 5]], [[6, 7], [8, 9]]"),
        ("doubles", [[0.5, -3.0]], b"[[0.16666666666666666, -1.0]"),
        (
            "ints",
            [list(range(17)), list(range(17))],  # 34 values in two rows
            b"[["
            + ", ".join(str(i + 1) for i in range(17)).encode()
            + b"], ["
            + ", ".join(str(i + 1) for i in range(17)).encode()
            + b"]",
        ),
    ],
)
def test_one_output_row_layouts(kitchen, signature, instances, expected):
    r = post(kitchen, {"signature_name": signature, "instances": instances})
    assert r.status_code == 200, r.text
    assert r.content == b'{\n    "predictions": ' + expected + b"\n    ]\n}"


def test_numbers_beyond_float32_become_infinity(kitchen):
    r = post(kitchen, {"signature_name": "floats", "inputs": [1e39, -1e39]})
    assert r.status_code == 200, r.text
    assert r.json() == {
        "outputs": {"scaled": [math.inf, -math.inf], "third": [math.inf, -math.inf], "tiny": [math.inf, -math.inf]}
    }


@pytest.mark.parametrize("pool", ["auto", "explicit"])
def test_rest_timeout_answers_504(start_server, tmp_path, pool):
    """A graph with a loop keeps cancellable session calls, whether inter-op threads are auto or set."""
    base = export_kitchen(tmp_path / "kitchen")
    flags = ["--tensorflow_inter_op_parallelism=2"] if pool == "explicit" else []
    server = start_server("--model_name=kitchen", f"--model_base_path={base}", "--rest_api_timeout_in_ms=300", *flags)
    url = server.rest + "/v1/models/kitchen:predict"
    assert post(url, {"signature_name": "slow", "inputs": {"n": 10}}).json() == {"outputs": 10}
    r = post(url, {"signature_name": "slow", "inputs": {"n": 10**10}})
    assert r.status_code == 504
    assert "error" in r.json()
    # the server is still serving afterwards
    assert post(url, {"signature_name": "slow", "inputs": {"n": 3}}).json() == {"outputs": 3}
