"""Python processing end to end: processing.py signatures beside a SavedModel (REST row and columnar, gRPC,
V2, metadata), pure-Python models hot-swapped under traffic, errors, deadlines and the pool, pipelines,
batched signatures, and the flag off."""

from __future__ import annotations

import concurrent.futures
import pickle
import shutil
import textwrap
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
import tensorflow as tf
from helpers import copy_version, free_port, post, run_cli, statuses, wait_for, write_warmup
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_log_pb2, prediction_service_pb2_grpc

FLAGS = ("--enable_python_processing", "--max_num_load_retries=0", "--file_system_poll_wait_seconds=1")

TAGGER = """
    import numpy as np
    from pyserving import processing

    VOCAB = {"apple": 0, "banana": 1, "cherry": 2, "date": 3}
    LABELS = np.array([b"fruit", b"berry", b"stone"], dtype=object)

    @processing.signature("tag_text", inputs={"text": ("string", [-1])}, outputs={"labels": ("string", [-1])})
    def tag_text(model, text):
        words = [t.decode() for t in text]
        unknown = [w for w in words if w not in VOCAB]
        if unknown:
            raise processing.InvalidArgument(f"unknown words: {', '.join(unknown)}")
        ids = np.array([VOCAB[w] for w in words], np.int64)
        out = model.predict("serving_default", {"ids": ids})
        return {"labels": LABELS[out["classes"]]}

    @processing.signature("crash", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1])})
    def crash(model, x):
        return {"y": {"a": 1}["missing"]}

    @processing.signature(
        "batch_rows", inputs={"x": ("float", [-1])}, outputs={"rows": ("int64", [-1])}, batched=True
    )
    def batch_rows(model, x):
        classes = model.predict("serving_default", {"ids": x.astype(np.int64)})["classes"]
        return {"rows": np.full(len(x), len(x)) + 0 * classes}
"""

RULES = """
    import os
    import pickle
    import sys

    import numpy as np
    from pyserving import processing

    with open(os.path.join(os.path.dirname(__file__), "weights.pkl"), "rb") as file:
        WEIGHTS = pickle.load(file)
    LABEL = "{label}"

    def transform(x):
        return x * WEIGHTS["scale"] + {offset}

    @processing.signature(
        "serving_default",
        inputs={{"x": ("float", [-1])}},
        outputs={{"y": ("float", [-1]), "label": ("string", []), "modules": ("int64", [])}},
    )
    def predict(model, x):
        loaded = [m for m in sys.modules if m.startswith("pyserving_processing_rules_")]
        return {{"y": transform(x), "label": f"{{LABEL}} {{model.name}} v{{model.version}}", "modules": len(loaded)}}
"""

PIPELINE = """
    from pyserving import processing

    @processing.signature(
        "serving_default",
        inputs={"text": ("string", [-1])},
        outputs={"labels": ("string", [-1]), "scaled": ("float", [-1])},
    )
    def pipeline(model, text):
        labels = model.predict("tag_text", {"text": text}, model_name="tagger")["labels"]
        lengths = [float(len(label)) for label in labels]
        scaled = model.predict("serving_default", {"x": lengths}, model_name="rules")["y"]
        return {"labels": labels, "scaled": scaled}
"""

SLEEPY = """
    import time
    from pyserving import processing

    @processing.signature("sleep_forever", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1])})
    def sleep_forever(model, x):
        time.sleep(3600)
        return {"y": x}

    @processing.signature("echo", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1])})
    def echo(model, x):
        return {"y": x}
"""


def _export_classifier(folder: Path) -> None:
    """ids int64 [n] -> classes = ids mod 3."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64, name="ids")])
    def classify(ids):
        return {"classes": tf.math.floormod(ids, 3)}

    module = tf.Module()
    module.classify = classify
    tf.saved_model.save(module, str(folder), signatures={"serving_default": classify})


def _write(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "processing.py").write_text(textwrap.dedent(text))
    return folder


def _rules_version(folder: Path, version: int) -> Path:
    _write(folder, RULES.format(label=f"rules-{version}", offset=version * 10))
    with open(folder / "weights.pkl", "wb") as file:
        pickle.dump({"scale": np.float32(version + 1)}, file)
    return folder


def _config(path: Path, models: dict[str, tuple[Path, str]]) -> Path:
    entries = "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "{platform}" }}\n'
        for name, (base, platform) in models.items()
    )
    path.write_text("model_config_list {\n" + entries + "}\n")
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("processing")
    _export_classifier(root / "tagger" / "1")
    _write(root / "tagger" / "1", TAGGER)
    (root / "tagger" / "1" / "batching_params.pbtxt").write_text(
        "max_batch_size { value: 8 } batch_timeout_micros { value: 300000 } max_enqueued_batches { value: 100 }"
    )
    _rules_version(root / "rules" / "1", 1)
    _rules_version(root / "staged_rules_2", 2)
    _write(root / "pipeline" / "1", PIPELINE)
    _rules_version(root / "fragile" / "1", 1)
    record = prediction_log_pb2.PredictionLog()
    record.predict_log.request.model_spec.name = "fragile"
    record.predict_log.request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], tf.float32))
    write_warmup(root / "fragile" / "1", [record.SerializeToString()])
    shutil.copytree(root / "tagger" / "1", root / "sleepy" / "1")
    _write(root / "sleepy" / "1", SLEEPY)
    return root


@pytest.fixture(scope="module")
def server(start_server, models):
    config = _config(
        models / "models.config",
        {
            "tagger": (models / "tagger", "tensorflow"),
            "rules": (models / "rules", "python"),
            "pipeline": (models / "pipeline", "python"),
            "fragile": (models / "fragile", "python"),
        },
    )
    monitoring = models / "monitoring.config"
    monitoring.write_text("prometheus_config { enable: true }")
    return start_server(
        f"--model_config_file={config}",
        *FLAGS,
        "--enable_batching",
        "--enable_per_model_batching_parameters",
        f"--monitoring_config_file={monitoring}",
    )


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc) as channel:
        yield prediction_service_pb2_grpc.PredictionServiceStub(channel)


def _predict(server, model: str, body: dict) -> requests.Response:
    return post(f"{server.rest}/v1/models/{model}:predict", body)


def test_rest_row_and_columnar_run_the_processing_signature_and_the_graph_stays(server):
    r = _predict(server, "tagger", {"signature_name": "tag_text", "instances": ["apple", "banana", "cherry", "date"]})
    assert (r.status_code, r.json()) == (200, {"predictions": ["fruit", "berry", "stone", "fruit"]})
    r = _predict(server, "tagger", {"signature_name": "tag_text", "inputs": {"text": ["cherry"]}})
    assert (r.status_code, r.json()) == (200, {"outputs": ["stone"]})
    r = _predict(server, "tagger", {"instances": [4, 5]})
    assert (r.status_code, r.json()) == (200, {"predictions": [1, 2]})


def test_grpc_predict_runs_the_processing_signature(stub):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tagger"
    request.model_spec.signature_name = "tag_text"
    request.inputs["text"].CopyFrom(tf.make_tensor_proto([b"date", b"banana"]))
    response = stub.Predict(request, timeout=30)
    assert response.model_spec.signature_name == "tag_text"
    assert response.model_spec.version.value == 1
    assert tf.make_ndarray(response.outputs["labels"]).tolist() == [b"fruit", b"berry"]


def test_v2_infer_names_the_processing_signature(server):
    body = {
        "parameters": {"signature_name": "tag_text"},
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["apple", "cherry"]}],
    }
    r = post(f"{server.rest}/v2/models/tagger/infer", body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "model_name": "tagger",
        "model_version": "1",
        "outputs": [{"name": "labels", "datatype": "BYTES", "shape": [2], "data": ["fruit", "stone"]}],
    }


def test_metadata_lists_processing_signatures_over_rest_and_grpc(server, stub):
    r = requests.get(f"{server.rest}/v1/models/tagger/metadata", timeout=10)
    signatures = r.json()["metadata"]["signature_def"]["signature_def"]
    assert sorted(signatures) == ["__saved_model_init_op", "batch_rows", "crash", "serving_default", "tag_text"]
    assert signatures["tag_text"] == {
        "inputs": {
            "text": {
                "dtype": "DT_STRING",
                "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
                "name": "processing/tag_text/input/text",
            }
        },
        "outputs": {
            "labels": {
                "dtype": "DT_STRING",
                "tensor_shape": {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False},
                "name": "processing/tag_text/output/labels",
            }
        },
        "method_name": "tensorflow/serving/predict",
        "defaults": {},
    }
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "rules"
    response = stub.GetModelMetadata(request, timeout=30)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    assert list(signature_map.signature_def) == ["serving_default"]
    outputs = signature_map.signature_def["serving_default"].outputs
    assert sorted(outputs) == ["label", "modules", "y"]
    assert outputs["label"].dtype == tf.string.as_datatype_enum
    assert list(outputs["label"].tensor_shape.dim) == []


def test_user_errors_answer_400_and_500_and_the_server_keeps_serving(server, stub):
    r = _predict(server, "tagger", {"signature_name": "tag_text", "instances": ["apple", "kiwi", "fig"]})
    assert (r.status_code, r.json()) == (400, {"error": "unknown words: kiwi, fig"})
    r = _predict(server, "tagger", {"signature_name": "crash", "instances": [1.0]})
    assert (r.status_code, r.json()) == (500, {"error": "KeyError: 'missing'"})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "tagger"
    request.model_spec.signature_name = "crash"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], tf.float32))
    with pytest.raises(grpc.RpcError) as failed:
        stub.Predict(request, timeout=30)
    assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.INTERNAL, "KeyError: 'missing'")
    log = server.output()
    assert "Processing signature crash of model tagger version 1 failed" in log
    assert "Traceback (most recent call last)" in log and 'return {"y": {"a": 1}["missing"]}' in log
    r = _predict(server, "tagger", {"signature_name": "tag_text", "instances": ["banana"]})
    assert (r.status_code, r.json()) == (200, {"predictions": ["berry"]})


def test_a_pipeline_calls_other_models(server):
    r = _predict(server, "pipeline", {"inputs": {"text": ["apple", "cherry"]}})
    # labels from tagger's tag_text; "fruit" and "stone" have 5 letters: rules version 1 gives 5 * 2 + 10
    assert (r.status_code, r.json()) == (200, {"outputs": {"labels": ["fruit", "stone"], "scaled": [20.0, 20.0]}})


def test_a_pure_python_version_warms_up_and_counts_in_the_runtime_metrics(server, models):
    file = models / "fragile" / "1" / "assets.extra" / "tf_serving_warmup_requests"
    assert f"Finished reading warmup data for model at {file}. Number of warmup records read: 1." in server.output()
    r = _predict(server, "fragile", {"inputs": {"x": [2.0]}})
    assert r.json()["outputs"]["y"] == [14.0]
    metrics = requests.get(server.rest + "/monitoring/prometheus/metrics", timeout=10).text.splitlines()
    counts = [line for line in metrics if line.startswith(":tensorflow:serving:runtime_latency_count{")]
    matching = [line for line in counts if 'model_name="fragile"' in line and 'runtime="Python"' in line]
    assert len(matching) == 1, counts
    line = matching[0]
    assert float(line.split()[-1]) >= 2  # the warmup record and the request


def test_a_batched_signature_receives_merged_batches(server):
    """Six one-row calls within the batch timeout (300 ms) of tagger's own batching parameters: one call of
    the function sees several rows (it answers each row with the batch's size)."""

    def call(i):
        r = _predict(server, "tagger", {"signature_name": "batch_rows", "instances": [float(i)]})
        assert r.status_code == 200, r.text
        return r.json()["predictions"][0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        sizes = list(pool.map(call, range(6)))
    assert max(sizes) > 1
    assert len(sizes) == 6 and all(1 <= s <= 6 for s in sizes)
    assert sizes.count(max(sizes)) >= max(sizes)  # every row of the biggest batch reported its size


def test_a_syntax_error_in_a_new_version_leaves_the_old_one_serving(server, models):
    broken = models / "staged_fragile_2"
    _rules_version(broken, 2)
    (broken / "processing.py").write_text("def broken(:\n")
    copy_version(broken, models / "fragile", 2)
    wait_for(lambda: (2, "END", "INVALID_ARGUMENT") in statuses(server, "fragile"), what="version 2 failing")
    status = requests.get(f"{server.rest}/v1/models/fragile/versions/2", timeout=10).json()
    file = models / "fragile" / "2" / "processing.py"
    assert status["model_version_status"][0]["status"]["error_message"] == (
        f"{file} failed to load: SyntaxError: invalid syntax (processing.py, line 1)"
    )
    r = _predict(server, "fragile", {"inputs": {"x": [1.0]}})
    assert r.status_code == 200
    assert r.json()["outputs"]["label"] == "rules-1 fragile v1"
    assert (1, "AVAILABLE", "OK") in statuses(server, "fragile")


def test_pure_python_versions_hot_swap_under_traffic(server, models, stub):
    """Version 2 (other code, other pickle, same function names) replaces version 1 while REST and gRPC
    clients call: no call fails, each answer is one version's, and version 1's module is unloaded."""
    expected = {1: ([12.0], "rules-1 rules v1"), 2: ([23.0], "rules-2 rules v2")}  # x=1: x*2+10, x*3+20
    failures: list[str] = []
    seen: list[int] = []
    stop = threading.Event()

    def rest():
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{server.rest}/v1/models/rules:predict", json={"inputs": {"x": [1.0]}}, timeout=30)
                outputs = r.json().get("outputs", {})
                answer = (outputs.get("y"), outputs.get("label"))
                if r.status_code != 200 or answer not in expected.values():
                    failures.append(f"REST {r.status_code} {r.text}")

    def grpc_calls():
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "rules"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], tf.float32))
        while not stop.is_set():
            try:
                response = stub.Predict(request, timeout=30)
            except grpc.RpcError as exc:
                failures.append(f"gRPC {exc.code()} {exc.details()}")
                continue
            version = response.model_spec.version.value
            seen.append(version)
            y = tf.make_ndarray(response.outputs["y"]).tolist()
            label = tf.make_ndarray(response.outputs["label"]).item().decode()
            if (y, label) != expected[version]:
                failures.append(f"gRPC version {version} answered {y} {label}")

    threads = [threading.Thread(target=rest), threading.Thread(target=grpc_calls)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: seen and seen[-1] == 1, what="version 1 answering")
        copy_version(models / "staged_rules_2", models / "rules", 2)
        wait_for(lambda: (1, "END", "OK") in statuses(server, "rules"), what="version 1 unloaded")
        count = len(seen)
        wait_for(lambda: len(seen) > count + 5, what="more answers")
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert failures == []
    assert seen[-1] == 2 and 1 in seen
    r = _predict(server, "rules", {"inputs": {"x": [1.0]}})
    assert r.json() == {"outputs": {"y": [23.0], "label": "rules-2 rules v2", "modules": 1}}


@pytest.fixture(scope="module")
def sleepy(start_server, models):
    return start_server(
        "--model_name=sleepy",
        f"--model_base_path={models / 'sleepy'}",
        *FLAGS,
        "--python_processing_threads=2",
        "--rest_api_timeout_in_ms=1000",
    )


def test_a_function_that_never_returns_is_bounded_and_a_held_pool_fails_fast(sleepy):
    with grpc.insecure_channel(sleepy.grpc) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "sleepy"
        request.model_spec.signature_name = "sleep_forever"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], tf.float32))
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            stub.Predict(request, timeout=1)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 5
        started = time.monotonic()
        r = _predict(sleepy, "sleepy", {"signature_name": "sleep_forever", "instances": [1.0]})
        assert (r.status_code, r.json()) == (
            504,
            {"error": "Processing signature sleep_forever of model sleepy version 1 did not return within 1000 ms"},
        )
        assert 0.9 < time.monotonic() - started < 5
        # Both threads are held now: processing calls fail at once, the graph still answers.
        message = (
            "All 2 Python processing threads are still running calls that passed their deadline; "
            "Python processing is unavailable until one returns"
        )
        for signature in ("echo", "sleep_forever"):
            started = time.monotonic()
            r = _predict(sleepy, "sleepy", {"signature_name": signature, "instances": [1.0]})
            assert (r.status_code, r.json()) == (503, {"error": message})
            assert time.monotonic() - started < 0.9
        request.model_spec.signature_name = "echo"
        with pytest.raises(grpc.RpcError) as unavailable:
            stub.Predict(request, timeout=30)
        assert (unavailable.value.code(), unavailable.value.details()) == (grpc.StatusCode.UNAVAILABLE, message)
        r = _predict(sleepy, "sleepy", {"instances": [4, 7]})
        assert (r.status_code, r.json()) == (200, {"predictions": [1, 1]})


def test_without_the_flag_processing_py_is_never_imported(start_server, models, tmp_path):
    base = tmp_path / "tagger"
    shutil.copytree(models / "tagger", base)
    (base / "1" / "batching_params.pbtxt").unlink()
    off = start_server("--model_name=tagger", f"--model_base_path={base}", "--max_num_load_retries=0")
    file = base / "1" / "processing.py"
    assert (
        f"{file} is not imported: the server runs without --enable_python_processing; model tagger version 1 "
        "serves its graph's signatures only"
    ) in off.output()
    r = requests.get(f"{off.rest}/v1/models/tagger/metadata", timeout=10)
    assert sorted(r.json()["metadata"]["signature_def"]["signature_def"]) == [
        "__saved_model_init_op",
        "serving_default",
    ]
    r = _predict(off, "tagger", {"signature_name": "tag_text", "instances": ["apple"]})
    assert (r.status_code, r.json()) == (
        400,
        {"error": 'Serving signature name: "tag_text" not found in signature def'},
    )
    r = _predict(off, "tagger", {"instances": [5]})
    assert (r.status_code, r.json()) == (200, {"predictions": [2]})


def test_without_the_flag_a_pure_python_model_fails_its_load_naming_it(models):
    result = run_cli(
        "--model_name=rules",
        f"--model_base_path={models / 'pipeline'}",  # detected: only processing.py
        f"--port={free_port()}",
        "--max_num_load_retries=0",
        timeout=120,
    )
    assert result.returncode == 255
    file = models / "pipeline" / "1" / "processing.py"
    assert (
        f"{file} is a pure-Python model: it is served only with --enable_python_processing "
        "(code in a model folder runs with the server's rights)"
    ) in result.stdout


def _readme_section() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return readme.split("\n## Processing in Python\n")[1].split("\n## ")[0]


def test_the_readme_example_from_files_to_curl(start_server, tmp_path):
    """The README's worked example as written: its export code, its processing.py, its curl bodies and answers."""
    section = _readme_section()
    export, processing_py = section.split("```python\n")[1:3]
    export, processing_py = export.split("```")[0], processing_py.split("```")[0]
    shell = section.split("```shell\n")[1].split("```")[0].splitlines()
    answers = section.split("```\n{")[1].split("```")[0]
    version = tmp_path / "models" / "fruit" / "1"
    exec(compile(export.replace('"models/fruit/1"', repr(str(version))), "export", "exec"), {})
    (version / "vocab.txt").write_text("apple\nbanana\ncherry\ndate\n")
    (version / "labels.txt").write_text("fruit\nberry\nstone\n")
    (version / "processing.py").write_text(processing_py)
    assert "`models/fruit/1/vocab.txt` holds `apple banana cherry date`" in section
    assert "`models/fruit/1/labels.txt` holds `fruit berry stone`" in section
    assert shell[0] == (
        "pyserving --model_name=fruit --model_base_path=$PWD/models/fruit --rest_api_port=8501 "
        "--enable_python_processing"
    )
    server = start_server("--model_name=fruit", f"--model_base_path={version.parent}", "--enable_python_processing")
    bodies = [line.split("-d '")[1].split("'")[0] for line in shell[1:]]
    got = "".join(
        requests.post(f"{server.rest}/v1/models/fruit:predict", data=body, timeout=30).text + "\n" for body in bodies
    )
    assert "{" + answers == got
