"""Hostile input and faults: every bad request gets a 4xx (or its gRPC equivalent); what serves keeps serving."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from helpers import (
    HALF_PLUS_TWO,
    Traffic,
    call_latencies,
    children,
    copy_version,
    post,
    predict_request,
    server_rss_mib,
    statuses,
    wait_for,
)
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

PREDICT = "/v1/models/half_plus_two:predict"


@pytest.mark.parametrize(
    "body, message",
    [
        (b'{"instances": [1.0, 2', "JSON Parse error: Missing a comma or ']' after an array element. at offset: 21"),
        (b"", "JSON Parse error: The document is empty"),
        (b"\xff\xfe\x00garbage", "JSON Parse error: Invalid value. at offset: 0"),
        (b'{"instances": "text"}', None),
        (
            b'{"instances": [[1.0], [1.0, 2.0]]}',
            "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
            "Expecting tensor size: 1 but got: 2",
        ),
        (b'{"instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
        (b'{"instances": ' + b"[" * 100_000, None),
        (b'{"instances": [{"b64": "%%%"}]}', None),
        (b'{"instances": ["\xff\xfe"]}', None),
        (b'{"inst\xffances": [1.0]}', "Missing 'inputs' or 'instances' key"),
        (b'{"instances": [1e999999]}', "JSON Parse error: Number too big to be stored in double. at offset: 15"),
        (b'{"inputs": {"x": [' + b"1.0," * 10 + b'1.0]}, "signature_name": {"a": 1}}', None),
    ],
)
def test_malformed_predict_bodies_get_a_400(half_plus_two, body, message):
    r = post(half_plus_two.rest + PREDICT, body)
    assert r.status_code == 400, r.text
    if message is not None:
        assert r.json() == {"error": message}
    else:
        assert r.json()["error"]


def _nested(depth: int, leaf: str = "1.0") -> str:
    return "[" * depth + leaf + "]" * depth


_SIGNATURE_NAME_ERROR = " not formatted correctly. 'signature_name' key must be a string value."


@pytest.mark.parametrize(
    "verb, body, message",
    [
        (
            "predict",
            rb'{"instances": ["\ud800"]}',
            "JSON Parse error: The surrogate pair in string is invalid. at offset: 16",
        ),
        # More than 64 dimensions: TF Serving decodes them, then Tensor::FromProto refuses the tensor.
        ("predict", '{"instances": %s}' % _nested(65), "tensor parsing error: x"),
        ("predict", '{"instances": %s}' % _nested(1023), "tensor parsing error: x"),
        ("predict", '{"inputs": %s}' % _nested(500), "tensor parsing error: x"),
        ("predict", '{"inputs": {"x": %s}}' % _nested(65), "tensor parsing error: x"),
        (
            "predict",
            '{"signature_name": %s, "inputs": [1.0]}' % _nested(1000),
            'JSON Value: {\n    "signature_name": ' + "[" * 232 + _SIGNATURE_NAME_ERROR,
        ),
        ("regress", '{"examples": %s}' % _nested(900), "Example must be JSON object but got JSON Array"),
        (
            "classify",
            '{"examples": [{"x": %s}]}' % _nested(900),
            "Feature: x has element with unexpected JSON type: Array",
        ),
        # Deeper than the parser's 1,024 levels.
        (
            "predict",
            '{"instances": %s}' % _nested(1024),
            "JSON Parse error: Terminate parsing due to Handler error. at offset: 0",
        ),
        # Integers beyond double range, as rapidjson refuses them (were OverflowError / 4,300-digit 500s).
        (
            "predict",
            '{"instances": [1%s]}' % ("0" * 309),
            "JSON Parse error: Number too big to be stored in double. at offset: 15",
        ),
        (
            "predict",
            '{"inputs": {"x": [-%s]}}' % ("9" * 5000),
            "JSON Parse error: Number too big to be stored in double. at offset: 18",
        ),
        (
            "predict",
            '{"inputs": [NaN, 2%s]}' % ("0" * 308),
            "JSON Parse error: Number too big to be stored in double. at offset: 17",
        ),
        (
            "classify",
            '{"examples": [{"x": 1%s}]}' % ("0" * 400),
            "JSON Parse error: Number too big to be stored in double. at offset: 20",
        ),
        (
            "regress",
            '{"context": {"x": [%s]}, "examples": [{}]}' % ("7" * 310),
            "JSON Parse error: Number too big to be stored in double. at offset: 19",
        ),
    ],
)
def test_hostile_json_gets_tf_servings_400(half_plus_two, verb, body, message):
    r = post(f"{half_plus_two.rest}/v1/models/half_plus_two:{verb}", body)
    assert (r.status_code, r.json()) == (400, {"error": message})


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/..%2F..%2Fetc%2Fpasswd:predict",
        "/v1/models/half_plus_two/labels/..%2F..:predict",
        "/v1/models/%2e%2e:predict",
        "/v1/models/half_plus_two/versions/99999999999999999999999:predict",
    ],
)
def test_path_tricks_get_a_4xx(half_plus_two, path):
    r = post(half_plus_two.rest + path, {"instances": [1.0]})
    assert r.status_code in (400, 404), r.text
    if r.content:
        assert "error" in r.json()


def test_body_over_the_limit_is_refused_before_it_is_read(half_plus_two):
    """64 MiB + 1 announced: 413 at once, without the server reading (or the client sending) the body."""
    with socket.create_connection(("127.0.0.1", half_plus_two.rest_port), timeout=10) as sock:
        sock.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: {64 * 1024 * 1024 + 1}\r\n\r\n".encode())
        response = b""
        while chunk := sock.recv(4096):  # the server answers and closes the connection
            response += chunk
    assert response.startswith(b"HTTP/1.1 413 ")
    assert b"Request body exceeds the limit of 67108864 bytes" in response


def test_unparsable_grpc_requests_get_invalid_argument(half_plus_two):
    methods = [
        f"/tensorflow.serving.PredictionService/{m}"
        for m in ("Predict", "Classify", "Regress", "MultiInference", "GetModelMetadata")
    ]
    methods += [f"/tensorflow.serving.ModelService/{m}" for m in ("GetModelStatus", "HandleReloadConfigRequest")]
    with grpc.insecure_channel(half_plus_two.grpc) as channel:
        for method in methods:
            call = channel.unary_unary(method)
            # Never random bytes: 64 random bytes parse as a valid message now and then (unknown fields).
            for payload in (
                b"\xff" * 16,  # a tag varint longer than 10 bytes
                b"\x0a\xff\xff\xff\xff\x0f",  # field 1 announces 4 GiB
                b"\x0a\x05\x0a",  # field 1 announces 5 bytes, 1 follows
                b"\x08\x80",  # a varint cut short
                b"\x0b",  # a group that never ends
                b"\x07",  # wire type 7
                b"\x00",  # field number 0
            ):
                with pytest.raises(grpc.RpcError) as error:
                    call(payload, timeout=10)
                assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.value.details())
                assert error.value.details().startswith("Failed to parse the request as tensorflow.serving.")
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=10)
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]


def test_half_sent_requests_do_not_block_others_and_are_dropped(start_server):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--rest_api_read_timeout_seconds=2"
    )
    quiet = []
    for partial in (
        b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Len",
        b"POST " + PREDICT.encode() + b' HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"inst',
        b"",
    ):
        sock = socket.create_connection(("127.0.0.1", server.rest_port), timeout=10)
        sock.sendall(partial)
        quiet.append(sock)
    started = time.monotonic()
    for _ in range(20):
        assert post(server.rest + PREDICT, {"instances": [1.0]}).json() == {"predictions": [2.5]}
    assert time.monotonic() - started < 10
    for sock in quiet:  # each is closed by the server once its 2 s are up, without an answer
        sock.settimeout(10)
        assert sock.recv(1024) == b""
        sock.close()


# -- faults -------------------------------------------------------------------------------------------


# -- decoded size, dimensions, Python details --------------------------------------------------------

_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def limited(start_server):
    """half_plus_two with --max_decoded_tensor_bytes at 1 MB."""
    return start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--max_decoded_tensor_bytes={_LIMIT}"
    )


def _compact_request(dtype: int, dims: list[int], **values) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tensor_pb2.TensorProto(dtype=dtype, **values))
    for size in dims:
        request.inputs["x"].tensor_shape.dim.add(size=size)
    return request


def _grpc_error(server, method: str, request) -> tuple[grpc.StatusCode, str]:
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            getattr(prediction_service_pb2_grpc.PredictionServiceStub(channel), method)(request, timeout=30)
    return error.value.code(), error.value.details()


def _too_big(name: str, shape: str, size: int) -> str:
    return (
        f"Input tensor {name} of shape [{shape}] needs {size} bytes decoded, over the limit of {_LIMIT} bytes "
        "(--max_decoded_tensor_bytes)"
    )


def test_decoded_tensor_limit_refuses_before_allocating(limited):
    # A body of 1 MiB starts the codec process (its memory is not this test's subject) before RSS is read.
    assert post(limited.rest + PREDICT, b" " * 2**20 + b"{}").status_code == 400
    rss = server_rss_mib(limited)
    floats = _compact_request(types_pb2.DT_FLOAT, [100_000_000], float_val=[1.0])
    assert floats.inputs["x"].ByteSize() < 30
    assert _grpc_error(limited, "Predict", floats) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        _too_big("x", "100000000", 400_000_000),
    )
    strings = _compact_request(types_pb2.DT_STRING, [2**31], string_val=[b"a"])  # got the process killed
    assert _grpc_error(limited, "Predict", strings) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        _too_big("x", "2147483648", 2**31 * 8 + 1),
    )
    body = '{"instances": [' + ", ".join(["1.0"] * 250_001) + "]}"
    r = post(limited.rest + PREDICT, body)
    assert (r.status_code, r.json()) == (400, {"error": _too_big("x", "250001", 1_000_004)})
    # Every example carries a copy of the context: 116 bytes serialized (and an 8-byte pointer) times 10,000.
    body = {"signature_name": "regress_x_to_y", "context": {"x": [1.0], "pad": "p" * 86}, "examples": [{}] * 10_000}
    r = post(limited.rest + "/v1/models/half_plus_two:regress", body)
    assert (r.status_code, r.json()) == (400, {"error": _too_big("inputs", "10000", 1_240_000)})
    assert server_rss_mib(limited) - rss < 50
    with grpc.insecure_channel(limited.grpc) as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(predict_request(), timeout=30)
    assert list(response.outputs["y"].float_val) == [2.5, 3.0, 4.5]


def test_more_than_64_dimensions_over_grpc_are_a_tensor_parsing_error(limited):
    request = _compact_request(types_pb2.DT_FLOAT, [1] * 65, float_val=[1.0])
    assert _grpc_error(limited, "Predict", request) == (grpc.StatusCode.INVALID_ARGUMENT, "tensor parsing error: x")
    assert "Traceback" not in limited.output()


_PYTHON_DETAILS = ("Error'", "<class", "Traceback", "codec can't")


def test_no_answer_carries_python_exception_details(limited):
    """Bad input that used to surface Python's exception names or messages (or 500s), over REST and gRPC."""
    classify_x = {"signature_name": "classify_x_to_y", "instances": [{"b64": "/w=="}]}  # not a tf.Example
    rest = [
        ("predict", classify_x),
        ("predict", rb'{"instances": ["\ud800"]}'),
        ("predict", '{"instances": %s}' % _nested(70)),
        ("predict", '{"signature_name": %s, "instances": [1.0]}' % _nested(900)),
        ("predict", '{"inputs": [NaN, %s]}' % ("9" * 5000)),
        ("classify", '{"examples": [{"x": %s}]}' % ("1" * 400)),
        ("regress", b'{"examples": [{"x\xff": [1.0]}]}'),
    ]
    answers = []
    for verb, body in rest:
        r = post(f"{limited.rest}/v1/models/half_plus_two:{verb}", body)
        assert r.status_code == 400, (verb, body, r.content)
        answers.append(r.content.decode("utf-8", "replace"))
    # TF's own message for a serialized example that does not parse, with the raw byte (as TF Serving sends it).
    assert post(limited.rest + PREDICT, classify_x).content == (
        b'{\n    "error": "Could not parse example input, value: \'\xff\'\\n\\t '
        b'[[{{node ParseExample/ParseExample}}]]"\n}'
    )
    not_example = _compact_request(types_pb2.DT_STRING, [1], string_val=[b"\xff"])
    not_example.model_spec.signature_name = "classify_x_to_y"
    not_example.inputs["inputs"].CopyFrom(not_example.inputs.pop("x"))
    grpc_requests = [
        ("Predict", not_example),
        ("Predict", _compact_request(types_pb2.DT_FLOAT, [1] * 65, float_val=[1.0])),
        ("Predict", _compact_request(types_pb2.DT_STRING, [2**31], string_val=[b"a"])),
        ("Predict", _compact_request(types_pb2.DT_HALF, [2], half_val=[1, 2])),  # a dtype the model does not take
    ]
    for method, request in grpc_requests:
        code, details = _grpc_error(limited, method, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, details)
        answers.append(details)
    assert answers[-4] == ("Could not parse example input, value: '\ufffd'\n\t [[{{node ParseExample/ParseExample}}]]")
    for answer in answers:
        assert not any(word in answer for word in _PYTHON_DETAILS), answer
    assert "Traceback" not in limited.output()


def _hanging_model(base: Path) -> None:
    """A TF1 SavedModel whose main_op (run at load) counts to 10^13: its load never ends."""
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        x = tf.compat.v1.placeholder(tf.float32, [None, 1], name="x")
        y = tf.identity(x, name="y")
        forever = tf.while_loop(lambda i: i < 10**13, lambda i: i + 1, [tf.constant(0, tf.int64)])[0]
        builder = tf.compat.v1.saved_model.Builder(str(base))
        signature = tf.compat.v1.saved_model.predict_signature_def({"x": x}, {"y": y})
        builder.add_meta_graph_and_variables(
            session, ["serve"], signature_def_map={"serving_default": signature}, main_op=tf.group(forever)
        )
        builder.save()


def test_faulty_new_versions_never_replace_the_working_one(start_server, tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    copy_version(HALF_PLUS_TWO / "00000123", base, 1)
    server = start_server(
        "--model_name=m",
        f"--model_base_path={base}",
        "--file_system_poll_wait_seconds=1",
        "--max_num_load_retries=0",
        "--num_load_threads=2",
    )
    traffic = Traffic(server, "m")
    try:
        # Truncated variables.
        truncated = base.parent / "truncated"
        shutil.copytree(HALF_PLUS_TWO / "00000123", truncated)
        data = next((truncated / "variables").glob("*.data-*"))
        data.write_bytes(data.read_bytes()[: len(data.read_bytes()) // 2])
        os.rename(truncated, base / "2")
        wait_for(lambda: statuses(server, "m")[0][:2] == (2, "END"), what="the truncated version to fail")
        assert statuses(server, "m")[0][2] != "OK"
        # A load that hangs: version 3 stays LOADING, version 1 keeps serving.
        _hanging_model(base.parent / "hanging")
        os.rename(base.parent / "hanging", base / "3")
        wait_for(lambda: statuses(server, "m")[0] == (3, "LOADING", "OK"), what="version 3 to hang in LOADING")
        time.sleep(2)
        assert (1, "AVAILABLE", "OK") in statuses(server, "m")
        assert traffic.serving(1)
    finally:
        traffic.stop()
    assert traffic.failures == []
    # A stuck load does not keep a stopped server alive.
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert time.monotonic() - started < 15


# -- soak ---------------------------------------------------------------------------------------------

SOAK_SECONDS = float(os.environ.get("PYSERVING_SOAK_SECONDS", "45"))


def test_soak_valid_and_invalid_traffic_while_versions_change(start_server, tmp_path):
    """Valid and invalid REST and gRPC traffic for SOAK_SECONDS while versions are added, broken and removed."""
    base = tmp_path / "m"
    base.mkdir()
    copy_version(HALF_PLUS_TWO / "00000123", base, 1)
    server = start_server(
        "--model_name=m", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1", "--max_num_load_retries=0"
    )
    valid = Traffic(server, "m")
    stop = threading.Event()
    invalid = {"sent": 0, "5xx": []}

    def hostile():
        bodies = [
            b"{",
            b'{"instances": "x"}',
            b'{"instances": [[1], [1, 2]]}',
            b"\xff" * 64,
            b'{"examples": [{"x": null}]}',
            b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        ]
        with requests.Session() as session, grpc.insecure_channel(server.grpc) as channel:
            raw = channel.unary_unary("/tensorflow.serving.PredictionService/Predict")
            while not stop.is_set():
                for body in bodies:
                    for path in ("/v1/models/m:predict", "/v1/models/m:classify", "/v1/models/x:regress"):
                        r = session.post(server.rest + path, data=body, timeout=30)
                        invalid["sent"] += 1
                        if r.status_code >= 500:
                            invalid["5xx"].append((path, body[:40], r.status_code, r.text[:200]))
                try:
                    raw(os.urandom(32), timeout=10)
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                        invalid["5xx"].append(("grpc", exc.code(), exc.details()))
                invalid["sent"] += 1

    thread = threading.Thread(target=hostile)
    thread.start()
    rss = [server_rss_mib(server)]
    version = 1
    started = time.monotonic()
    try:
        while time.monotonic() - started < SOAK_SECONDS:
            version += 1
            step = version % 3
            if step == 0:  # a good new version
                copy_version(HALF_PLUS_TWO / "00000123", base, version)
            elif step == 1:  # a broken one
                (base / str(version)).mkdir()
                (base / str(version) / "saved_model.pb").write_bytes(os.urandom(256))
            else:  # remove the newest folders but the oldest good one
                for folder in sorted(base.iterdir(), key=lambda p: int(p.name))[1:]:
                    shutil.rmtree(folder)
            time.sleep(3)
            rss.append(server_rss_mib(server))
    finally:
        stop.set()
        thread.join(60)
        valid.stop()
    print(
        f"\nsoak {SOAK_SECONDS:.0f} s: valid requests {valid.sent}, failed {len(valid.failures)}; invalid requests "
        f"{invalid['sent']}, 5xx {len(invalid['5xx'])}; versions changed {version - 1} times; "
        f"RSS {min(rss):.0f}-{max(rss):.0f} MiB"
    )
    assert valid.failures == []
    assert invalid["5xx"] == []
    assert valid.sent > 100 and invalid["sent"] > 100
    assert max(rss) - rss[0] < 300
    assert server.proc.poll() is None


def _codec_processes(pid: int) -> list[int]:
    """The codec processes under the server `pid` (its own, or with --num_workers its workers')."""
    found = []
    for child, cmdline in children(pid).items():
        if b"pyserving.workers\0codec" in cmdline:
            found.append(child)
        found.extend(_codec_processes(child))
    return found


def _watch_loop_lag(server, attackers: list[threading.Thread], lags: list[float]) -> None:
    """`:pyserving:event_loop_lag_seconds`, read every 0.25 s while any attacker runs."""
    session = requests.Session()
    while any(attacker.is_alive() for attacker in attackers):
        page = session.get(server.rest + "/metrics", timeout=10).text.splitlines()
        lags.extend(float(line.split()[1]) for line in page if line.startswith(":pyserving:event_loop_lag_seconds "))
        time.sleep(0.25)


def test_big_bodies_delay_neither_rest_nor_grpc(start_server):
    """A big body parsed, or a big answer written, under the server's GIL held every client up for as long
    (a 19 MiB body: 0.3 to 0.65 s). They run in a codec process (TF Serving's API and V2 REST), so concurrent
    REST and gRPC calls stay fast; the process and its shared-memory folder go with the server."""
    folders = set(Path("/dev/shm").glob("pyserving-codec-*"))
    server = start_server("--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--metrics_path=/metrics")
    count = 5_000_000
    hostile = b'{"signature_name": 5, "inputs": [' + b"1," * (count - 1) + b"1]}"  # 9.5 MiB
    valid = b'{"instances": [' + b"1.5," * (count - 1) + b"1.5]}"  # 19 MiB in, 28.6 MiB out
    expected = b'{\n    "predictions": [' + b", ".join([b"2.75"] * count) + b"\n    ]\n}"
    rows = count // 2
    v2 = json.dumps({"inputs": [{"name": "x", "shape": [rows, 1], "datatype": "FP32", "data": [1.5] * rows}]})
    answers: list[tuple[int, bytes]] = []
    v2_answers: list[tuple[int, bytes]] = []

    def attack(body: bytes, times: int) -> None:
        session = requests.Session()
        for _ in range(times):
            response = session.post(server.rest + PREDICT, data=body, timeout=120)
            answers.append((response.status_code, response.content))

    def attack_v2(times: int) -> None:
        session = requests.Session()
        for _ in range(times):
            response = session.post(server.rest + "/v2/models/half_plus_two/infer", data=v2, timeout=120)
            v2_answers.append((response.status_code, response.content))  # parsed after: it would hold our GIL

    attack(hostile, 1)  # the codec process starts (once)
    quiet_end = time.monotonic() + 1.5
    quiet_rest, quiet_grpc = call_latencies(server, lambda: time.monotonic() >= quiet_end)
    attackers = [
        threading.Thread(target=attack, args=(hostile, 3)),
        threading.Thread(target=attack, args=(valid, 2)),
        threading.Thread(target=attack_v2, args=(2,)),
    ]
    lags: list[float] = []
    watcher = threading.Thread(target=_watch_loop_lag, args=(server, attackers, lags))
    for attacker in [*attackers, watcher]:
        attacker.start()
    busy_rest, busy_grpc = call_latencies(server, lambda: not any(a.is_alive() for a in attackers))
    for attacker in [*attackers, watcher]:
        attacker.join()

    assert len(answers) == 6 and len(busy_rest) > 100
    refusals = [content for status, content in answers if status == 400]
    assert len(refusals) == 4 and all(content == refusals[0] for content in refusals)
    message = json.loads(refusals[0])["error"]
    assert message.startswith('JSON Value: {\n    "signature_name": 5,\n    "inputs": [1, 1, 1,')
    assert message.endswith("not formatted correctly. 'signature_name' key must be a string value.")
    assert len(refusals[0]) < 64 * 1024  # an error costs the size of its message, not of the body
    assert [content == expected for status, content in answers if status == 200] == [True, True]
    [(status, v2_answer)] = set(v2_answers)
    assert status == 200 and len(v2_answers) == 2
    assert json.loads(v2_answer)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [rows, 1], "data": [2.75] * rows}
    ]
    # The server's own view: its event loop's worst timer lag of each second (without codec processes: 186 to
    # 517 ms; with them 0.4 to 4.2 ms alone, 29 ms once in a whole-tier run on 2 cores; with --num_workers, the
    # model process's loop).
    assert len(lags) > 10 and max(lags) < 0.06, lags
    # The clients' view, which includes this process's and the machine's load: the worst call under attack stays
    # close to the quiet ones (2-core machine: 100 ms).
    assert max(busy_rest) < max(quiet_rest) + 0.1, (statistics.median(busy_rest), max(busy_rest), max(quiet_rest))
    assert max(busy_grpc) < max(quiet_grpc) + 0.1, (statistics.median(busy_grpc), max(busy_grpc), max(quiet_grpc))
    codecs = _codec_processes(server.proc.pid)  # one (with --num_workers, one per worker that got a big body)
    assert codecs and server.output().count("Started codec process ") == len(codecs)

    server.stop()
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in codecs), timeout=10)
    assert set(Path("/dev/shm").glob("pyserving-codec-*")) == folders
