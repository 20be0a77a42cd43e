"""Model lifecycle: config files, version policies, labels, hot loading, config reload and warmup."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import grpc
import pytest
import requests
import tensorflow as tf
from helpers import (
    HALF_PLUS_TWO,
    MODELS,
    Traffic,
    copy_version,
    counter_warmup,
    get_counter,
    grpc_predict,
    model_pid,
    post,
    reload,
    rss_mib,
    run_cli,
    statuses,
    wait_for,
    write_config,
    write_warmup,
)
from models import export_kitchen
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    prediction_log_pb2,
)

TWO_VERSIONS = MODELS / "saved_model_half_plus_two_2_versions"
TF2 = MODELS / "saved_model_half_plus_two_tf2_cpu"
THREE = MODELS / "saved_model_half_plus_three"
COUNTER = MODELS / "saved_model_counter"
FAST_RETRIES = ("--max_num_load_retries=2", "--load_retry_interval_micros=300000")


# -- config file ------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_config_file_serves_tf1_and_tf2_models_side_by_side(start_server, tmp_path):
    config = write_config(
        tmp_path / "models.config",
        {"name": "half_plus_two", "path": HALF_PLUS_TWO},
        {"name": "tf2", "path": TF2},
        {"name": "three", "path": THREE},
    )
    server = start_server(f"--model_config_file={config}")
    for name, expected in (("half_plus_two", [2.5, 3.0]), ("tf2", [2.5, 3.0]), ("three", [3.5, 4.0])):
        r = post(f"{server.rest}/v1/models/{name}:predict", {"instances": [1.0, 2.0]})
        assert r.status_code == 200, r.text
        assert r.json() == {"predictions": expected}
        assert statuses(server, name) == [(123, "AVAILABLE", "OK")]
    assert "Building single TensorFlow model file config" not in server.output()


def test_good_model_config_from_tf_serving_testdata(start_server, tmp_path):
    text = (MODELS / "good_model_config.txt").read_text()
    text = text.replace("${TEST_HALF_PLUS_TWO_DIR}", str(HALF_PLUS_TWO))
    text = text.replace("${TEST_HALF_PLUS_THREE_DIR}", str(THREE))
    (tmp_path / "good.config").write_text(text)
    server = start_server(f"--model_config_file={tmp_path / 'good.config'}")
    for name, expected in (("half_plus_three", 4.0), ("half_plus_two", 3.0)):
        r = post(f"{server.rest}/v1/models/{name}:predict", {"instances": [2.0]})
        assert r.json() == {"predictions": [expected]}


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "INVALID_ARGUMENT: Invalid protobuf file: '{path}'"),
        (
            'model_config_list { config { name: "m" base_path: "/x" model_platform: "tensorflow" } '
            'config { name: "m" base_path: "/y" model_platform: "tensorflow" } }',
            "INVALID_ARGUMENT: Illegal to list model m multiple times in config list",
        ),
        (
            'model_config_list { config { name: "m" base_path: "/x" } }',
            "INVALID_ARGUMENT: Illegal setting neither ModelServerConfig::model_type (deprecated) nor "
            "ModelServerConfig::model_platform.",
        ),
        (
            'model_config_list { config { name: "m" base_path: "/x" model_platform: "pytorch" } }',
            "INVALID_ARGUMENT: Model m requests unsupported platform pytorch",
        ),
        (
            'model_config_list { config { name: "m" base_path: "models/m" model_platform: "tensorflow" } }',
            "INVALID_ARGUMENT: Expected model m to have an absolute path or URI; got base_path()=models/m",
        ),
    ],
)
def test_bad_config_file_fails_start_up_with_tf_serving_message(tmp_path, text, message):
    path = tmp_path / "models.config"
    if text is None:
        shutil.copy(MODELS / "bad_model_config.txt", path)
    else:
        path.write_text(text)
    result = run_cli(f"--model_config_file={path}", "--port=0", "--grpc_socket_path=" + str(tmp_path / "s"))
    assert result.returncode == 255
    assert f"Failed to start server. Error: {message.format(path=path)}\n" in result.stdout


def test_missing_config_file_fails_start_up(tmp_path):
    result = run_cli(f"--model_config_file={tmp_path / 'nope.config'}")
    assert result.returncode == 255
    assert (
        f"Failed to start server. Error: NOT_FOUND: {tmp_path / 'nope.config'}; No such file or directory\n"
        in result.stdout
    )


# -- version policies and labels ----------------------------------------------------------------------


def test_version_policies(start_server, tmp_path):
    config = write_config(
        tmp_path / "models.config",
        {"name": "latest", "path": TWO_VERSIONS},
        {"name": "latest2", "path": TWO_VERSIONS, "extra": "model_version_policy { latest { num_versions: 2 } }"},
        {"name": "all", "path": TWO_VERSIONS, "extra": "model_version_policy { all {} }"},
        {
            "name": "specific",
            "path": TWO_VERSIONS,
            "extra": "model_version_policy { specific { versions: 123 versions: 999 } }",
        },
    )
    server = start_server(f"--model_config_file={config}")
    both = [(124, "AVAILABLE", "OK"), (123, "AVAILABLE", "OK")]
    assert statuses(server, "latest") == [(124, "AVAILABLE", "OK")]
    assert statuses(server, "latest2") == both
    assert statuses(server, "all") == both
    assert statuses(server, "specific") == [(123, "AVAILABLE", "OK")]
    with grpc.insecure_channel(server.grpc) as channel:
        assert grpc_predict(channel, "specific").model_spec.version.value == 123
        assert grpc_predict(channel, "all").model_spec.version.value == 124
        assert grpc_predict(channel, "all", version=123).model_spec.version.value == 123
        with pytest.raises(grpc.RpcError) as error:
            grpc_predict(channel, "latest", version=123)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert error.value.details() == "Servable not found for request: Specific(latest, 123)"
    assert (
        "Version 999 of servable specific, which was requested to be served as a 'specific' version" in server.output()
    )


LABELLED = {
    "name": "m",
    "path": TWO_VERSIONS,
    "extra": "model_version_policy { all {} } "
    "version_labels { key: 'stable' value: 123 } version_labels { key: 'canary' value: 124 }",
}


def test_labels_in_the_initial_config_need_the_allow_flag(tmp_path):
    config = write_config(tmp_path / "models.config", LABELLED)
    result = run_cli(f"--model_config_file={config}", "--port=0", "--grpc_socket_path=" + str(tmp_path / "s"))
    assert result.returncode == 255
    # Labels are checked in name order: canary (124) first.
    assert (
        "Failed to start server. Error: FAILED_PRECONDITION: Request to assign label to version 124 of model m, "
        "which is not currently available for inference\n"
    ) in result.stdout


def test_labels_over_rest_and_grpc(start_server, tmp_path):
    config = write_config(tmp_path / "models.config", LABELLED)
    server = start_server(f"--model_config_file={config}", "--allow_version_labels_for_unavailable_models=true")
    body = {"instances": [1.0]}
    assert post(f"{server.rest}/v1/models/m/labels/stable:predict", body).json() == {"predictions": [2.5]}
    metadata = requests.get(f"{server.rest}/v1/models/m/labels/canary/metadata", timeout=10).json()
    assert metadata["model_spec"]["version"] == "124"
    metadata = requests.get(f"{server.rest}/v1/models/m/labels/stable/metadata", timeout=10).json()
    assert metadata["model_spec"]["version"] == "123"
    r = post(f"{server.rest}/v1/models/m/labels/nope:predict", body)
    assert (r.status_code, r.json()) == (400, {"error": "Unrecognized servable version label: nope"})
    r = post(f"{server.rest}/v1/models/unknown/labels/stable:predict", body)
    assert (r.status_code, r.json()) == (400, {"error": "Unrecognized servable version label: stable"})
    with grpc.insecure_channel(server.grpc) as channel:
        assert grpc_predict(channel, "m", version_label="canary").model_spec.version.value == 124
        assert grpc_predict(channel, "m", version_label="stable").model_spec.version.value == 123
        with pytest.raises(grpc.RpcError) as error:
            grpc_predict(channel, "m", version_label="nope")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == "Unrecognized servable version label: nope"

        # A new label may name a version that is not loaded (the flag is set) ...
        moved = dict(LABELLED, extra=LABELLED["extra"] + " version_labels { key: 'beta' value: 999 }")
        assert reload(channel, moved).status.error_code == 0
        r = post(f"{server.rest}/v1/models/m/labels/beta:predict", body)
        assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Specific(m, 999)"})
        # ... but an existing label never moves to a version that cannot serve.
        moved = dict(LABELLED, extra=LABELLED["extra"].replace("value: 124", "value: 125"))
        with pytest.raises(grpc.RpcError) as error:
            reload(channel, moved)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.value.details() == (
            "Request to assign label to version 125 of model m, which is not currently available for inference"
        )
        assert grpc_predict(channel, "m", version_label="canary").model_spec.version.value == 124


# -- config reload ------------------------------------------------------------------------------------


def test_reload_config_adds_relabels_and_removes_models(start_server, tmp_path):
    a = {"name": "a", "path": TWO_VERSIONS}
    b = {"name": "b", "path": TF2}
    config = write_config(tmp_path / "models.config", a)
    server = start_server(f"--model_config_file={config}", "--max_num_load_retries=0")
    with grpc.insecure_channel(server.grpc) as channel:
        response = reload(channel, a, b)
        assert response.status.error_code == 0 and response.status.error_message == ""
        assert grpc_predict(channel, "b", x=[2.0]).outputs["y"].float_val == [3.0]

        # Re-policy and label a version that is available now.
        a_all = dict(a, extra="model_version_policy { all {} } version_labels { key: 'stable' value: 124 }")
        reload(channel, a_all, b)
        wait_for(
            lambda: statuses(server, "a") == [(124, "AVAILABLE", "OK"), (123, "AVAILABLE", "OK")],
            what="version 123 of a to load",
        )
        assert grpc_predict(channel, "a", version_label="stable").model_spec.version.value == 124

        # Invalid configs are refused and change nothing.
        for models, code, message in (
            ((a, b, b), grpc.StatusCode.INVALID_ARGUMENT, "Illegal to list model b multiple times in config list"),
            (
                (dict(a, extra="version_labels { key: 'x' value: 7 }"),),
                grpc.StatusCode.FAILED_PRECONDITION,
                "Request to assign label to version 7 of model a, which is not currently available for inference",
            ),
        ):
            with pytest.raises(grpc.RpcError) as error:
                reload(channel, *models)
            assert (error.value.code(), error.value.details()) == (code, message)
        with pytest.raises(grpc.RpcError) as error:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(), timeout=30
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error.value.details() == (
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported"
        )
        assert grpc_predict(channel, "b").model_spec.version.value == 123
        assert grpc_predict(channel, "a", version_label="stable").model_spec.version.value == 124

        # A new model that cannot load: the reload says so, the others keep serving.
        with pytest.raises(grpc.RpcError) as error:
            reload(channel, a_all, b, {"name": "bad", "path": MODELS / "bad_half_plus_two"})
        assert error.value.code() == grpc.StatusCode.UNKNOWN
        assert error.value.details().startswith(
            "1 model(s) did not become available: {{{name: bad version: 123} due to error: NOT_FOUND: "
            "Could not find SavedModel .pb or .pbtxt at supplied export directory path: "
        )
        assert statuses(server, "bad") == [(123, "END", "NOT_FOUND")]

        # Removing a model unloads it; its versions stay listed as END.
        reload(channel, b)
        wait_for(lambda: statuses(server, "a") == [(124, "END", "OK"), (123, "END", "OK")], what="a to unload")
        with pytest.raises(grpc.RpcError) as error:
            grpc_predict(channel, "a")
        assert (error.value.code(), error.value.details()) == (
            grpc.StatusCode.NOT_FOUND,
            "Servable not found for request: Latest(a)",
        )
        assert grpc_predict(channel, "b").model_spec.version.value == 123


def test_config_file_polling_applies_good_configs_and_ignores_bad_ones(start_server, tmp_path):
    a = {"name": "a", "path": HALF_PLUS_TWO}
    b = {"name": "b", "path": THREE}
    config = write_config(tmp_path / "models.config", a)
    server = start_server(f"--model_config_file={config}", "--model_config_file_poll_wait_seconds=1")
    write_config(config, a, b)
    wait_for(lambda: statuses(server, "b") == [(123, "AVAILABLE", "OK")], what="model b")
    assert post(f"{server.rest}/v1/models/b:predict", {"instances": [2.0]}).json() == {"predictions": [4.0]}
    config.write_text("improperly formatted file")
    wait_for(
        lambda: "Failed to read ModelServerConfig file: Invalid protobuf file" in server.output(),
        what="the parse error to be logged",
    )
    assert statuses(server, "a") == [(123, "AVAILABLE", "OK")]
    assert statuses(server, "b") == [(123, "AVAILABLE", "OK")]
    write_config(config, b)
    wait_for(lambda: statuses(server, "a") == [(123, "END", "OK")], what="model a to unload")
    assert post(f"{server.rest}/v1/models/b:predict", {"instances": [2.0]}).json() == {"predictions": [4.0]}


def test_a_nul_byte_in_a_reloaded_base_path_is_refused_and_loading_goes_on(start_server, tmp_path):
    base = tmp_path / "a"
    base.mkdir()
    copy_version(HALF_PLUS_TWO / "00000123", base, 123)
    config = write_config(tmp_path / "models.config", {"name": "a", "path": base})
    server = start_server(f"--model_config_file={config}", "--file_system_poll_wait_seconds=1")
    with grpc.insecure_channel(server.grpc) as channel:
        request = model_management_pb2.ReloadConfigRequest()
        request.config.model_config_list.config.add(name="a", base_path=f"{base}\0x", model_platform="tensorflow")
        with pytest.raises(grpc.RpcError) as error:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=60)
        assert (error.value.code(), error.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expected model a to have a base_path without NUL bytes; got base_path()={base}\\000x",
        )
        copy_version(HALF_PLUS_TWO / "00000123", base, 124)  # the fs-poll thread still loads new versions
        wait_for(lambda: statuses(server, "a") == [(124, "AVAILABLE", "OK"), (123, "END", "OK")], what="a/124")
        response = reload(channel, {"name": "a", "path": base}, {"name": "b", "path": THREE})  # a good one applies
        assert response.status.error_code == 0
        assert statuses(server, "b") == [(123, "AVAILABLE", "OK")]
    ready = requests.get(f"{server.rest}/readyz", timeout=10)
    assert (ready.status_code, ready.json()) == (200, {"ready": True, "models": {"a": "AVAILABLE", "b": "AVAILABLE"}})


# -- hot loading --------------------------------------------------------------------------------------


@pytest.mark.smoke
def test_versions_swap_under_traffic_without_a_failed_request(start_server, tmp_path):
    version_dir = HALF_PLUS_TWO / "00000123"
    base = tmp_path / "m"
    base.mkdir()
    copy_version(version_dir, base, 1)
    server = start_server(
        "--model_name=m",
        f"--model_base_path={base}",
        "--file_system_poll_wait_seconds=1",
        "--max_num_load_retries=5",
        "--load_retry_interval_micros=1000000",
    )
    traffic = Traffic(server, "m")
    try:
        wait_for(lambda: traffic.serving(1), what="traffic")
        # A new version loads while 1 serves, then 1 unloads.
        appeared = time.monotonic()
        copy_version(version_dir, base, 2)
        wait_for(lambda: (2, "AVAILABLE", "OK") in statuses(server, "m"), what="version 2")
        time_to_available = time.monotonic() - appeared
        wait_for(lambda: statuses(server, "m") == [(2, "AVAILABLE", "OK"), (1, "END", "OK")], what="1 to unload")
        wait_for(lambda: traffic.serving(2), what="traffic on version 2")

        # A folder still being copied: its first load fails, a retry picks it up once complete.
        partial = base / "3"
        shutil.copytree(version_dir / "variables", partial / "variables")
        time.sleep(1.5)
        shutil.copy(version_dir / "saved_model.pb", partial / "saved_model.pb")
        wait_for(lambda: statuses(server, "m")[:1] == [(3, "AVAILABLE", "OK")], what="version 3")
        wait_for(lambda: traffic.serving(3), what="traffic on version 3")

        # A broken version ends in END with its error; 3 keeps serving.
        broken = base / "4"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"this is not a SavedModel")
        wait_for(
            lambda: (
                statuses(server, "m")[:1] == [(4, "END", "DATA_LOSS")]
                or statuses(server, "m")[:1] == [(4, "END", "UNKNOWN")]
            ),
            timeout=90,
            what="version 4 to fail",
        )
        assert statuses(server, "m")[1] == (3, "AVAILABLE", "OK")
        assert traffic.serving(3)

        # Rollback: delete the newest folders; version 2 comes back before 3 goes.
        shutil.rmtree(broken)
        shutil.rmtree(partial)
        wait_for(lambda: statuses(server, "m")[1:3] == [(3, "END", "OK"), (2, "AVAILABLE", "OK")], what="rollback to 2")
        wait_for(lambda: traffic.serving(2), what="traffic back on version 2")
    finally:
        traffic.stop()
    print(
        f"\nswap figures: requests sent {traffic.sent}, failed {len(traffic.failures)}, "
        f"new folder to AVAILABLE {time_to_available:.2f} s"
    )
    assert traffic.failures == []
    assert traffic.sent > 100
    assert "Loading servable: {name: m version: 4} failed" in server.output()


def test_emptied_base_path_unloads_and_missing_base_path_keeps_serving(start_server, tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    copy_version(HALF_PLUS_TWO / "00000123", base, 1)
    server = start_server("--model_name=m", f"--model_base_path={base}", "--file_system_poll_wait_seconds=1")
    moved = tmp_path / "moved"
    os.rename(base, moved)  # the base path disappears: nothing changes
    wait_for(lambda: "Could not find base path" in server.output(), what="the missing base path to be logged")
    assert statuses(server, "m") == [(1, "AVAILABLE", "OK")]
    os.rename(moved, base)
    shutil.rmtree(base / "1")  # the base path is there but empty: everything unloads
    wait_for(lambda: statuses(server, "m") == [(1, "END", "OK")], what="version 1 to unload")
    r = post(f"{server.rest}/v1/models/m:predict", {"instances": [1.0]})
    assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Latest(m)"})


# -- warmup -------------------------------------------------------------------------------------------


@pytest.fixture()
def counters(tmp_path) -> tuple[Path, Path]:
    """Two copies of the stateful counter, with one and with two incr_counter warmup records."""
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(COUNTER, one)
    shutil.copytree(COUNTER, two)
    write_warmup(one / "00000123", [counter_warmup()])
    write_warmup(two / "00000123", [counter_warmup(), counter_warmup()])
    return one, two


def test_warmup_replays_each_record_num_request_iterations_times(start_server, tmp_path, counters):
    config = write_config(
        tmp_path / "models.config", {"name": "one", "path": counters[0]}, {"name": "two", "path": counters[1]}
    )
    server = start_server(f"--model_config_file={config}", "--num_request_iterations_for_warmup=3")
    assert get_counter(server, "one") == 3
    assert get_counter(server, "two") == 6
    assert "Number of warmup records read: 2." in server.output()


def test_warmup_off_and_default_iterations(start_server, tmp_path, counters):
    server = start_server("--model_name=one", f"--model_base_path={counters[0]}", "--enable_model_warmup=false")
    assert get_counter(server, "one") == 0
    server = start_server("--model_name=two", f"--model_base_path={counters[1]}")
    assert get_counter(server, "two") == 2


@pytest.mark.parametrize(
    "records, message",
    [
        (None, "DATA_LOSS: corrupted record at 0"),
        ([b"\xff\xff not a proto"], "INVALID_ARGUMENT: Failed to parse warmup record: "),
        (
            [counter_warmup("no_such_signature")],
            'FAILED_PRECONDITION: Serving signature key "no_such_signature" not found.',
        ),
        # To the end of the line: "...at <file>}, }" (saved_model_warmup_util.cc, load_servables_fast.cc).
        (
            [counter_warmup()] * 1001,
            "INVALID_ARGUMENT: Number of warmup records exceeds the maximum (1000) at "
            "{base}/00000123/assets.extra/tf_serving_warmup_requests}}, }}\n",
        ),
    ],
)
def test_bad_warmup_fails_the_load(tmp_path, records, message):
    base = tmp_path / "counter"
    shutil.copytree(COUNTER, base)
    if records is None:
        (base / "00000123" / "assets.extra").mkdir()
        (base / "00000123" / "assets.extra" / "tf_serving_warmup_requests").write_bytes(b"not a TFRecord file")
    else:
        write_warmup(base / "00000123", records)
    result = run_cli(
        "--model_name=counter",
        f"--model_base_path={base}",
        "--max_num_load_retries=0",
        "--port=0",
        "--grpc_socket_path=" + str(tmp_path / "s"),
    )
    assert result.returncode == 255
    assert (
        "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become available: "
        "{{{name: counter version: 123} due to error: " + message.format(base=base)
    ) in result.stdout


def test_unload_waits_for_requests_in_flight(start_server, tmp_path):
    base = export_kitchen(tmp_path / "kitchen")
    server = start_server(
        "--model_name=kitchen",
        f"--model_base_path={base}",
        "--file_system_poll_wait_seconds=1",
        "--num_load_threads=2",
        "--num_unload_threads=2",
    )
    url = f"{server.rest}/v1/models/kitchen:predict"
    started = time.monotonic()
    assert post(url, {"signature_name": "slow", "inputs": {"n": 200_000}}).json() == {"outputs": 200_000}
    n = int(200_000 * 4.0 / max(time.monotonic() - started, 0.01))  # about four seconds of work
    result: dict = {}
    slow = threading.Thread(target=lambda: result.update(r=post(url, {"signature_name": "slow", "inputs": {"n": n}})))
    slow.start()
    time.sleep(0.3)
    copy_version(base / "1", base, 2)
    # Version 2 takes over; version 1 cannot close while the slow request holds it.
    wait_for(
        lambda: statuses(server, "kitchen") == [(2, "AVAILABLE", "OK"), (1, "UNLOADING", "OK")],
        what="version 1 to wait in UNLOADING",
    )
    slow.join(60)
    assert (result["r"].status_code, result["r"].json()) == (200, {"outputs": n})
    wait_for(lambda: statuses(server, "kitchen") == [(2, "AVAILABLE", "OK"), (1, "END", "OK")], what="version 1 to end")


class _Big(tf.Module):
    """A model holding a 64 MiB variable, so its memory shows in RSS."""

    def __init__(self) -> None:
        self.weights = tf.Variable(tf.ones([16 * 1024 * 1024]))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32)])
    def __call__(self, index):
        return {"y": tf.gather(self.weights, index)}


def test_unloaded_versions_give_their_memory_back(start_server, tmp_path):
    module = _Big()
    tf.saved_model.save(module, str(tmp_path / "big" / "1"), signatures=module.__call__)
    small = {"name": "small", "path": HALF_PLUS_TWO}
    big = {"name": "big", "path": tmp_path / "big"}
    server = start_server(f"--model_config_file={write_config(tmp_path / 'models.config', small)}")
    pid = model_pid(server)
    baseline = rss_mib(pid)
    with grpc.insecure_channel(server.grpc) as channel:
        for _ in range(5):
            reload(channel, small, big)
            loaded = rss_mib(pid)
            assert loaded > baseline + 50
            reload(channel, small)
            wait_for(lambda: statuses(server, "big") == [(1, "END", "OK")], what="big to unload")
            assert rss_mib(pid) < loaded - 50
    assert rss_mib(pid) < baseline + 20


def example_warmup(kind: str, signature: str) -> bytes:
    """A classify_log / regress_log / multi_inference_log record for half_plus_two."""
    log = prediction_log_pb2.PredictionLog()
    if kind == "multi_inference_log":
        request = log.multi_inference_log.request
        for name, method in (
            (signature, "tensorflow/serving/regress"),
            ("classify_x_to_y", "tensorflow/serving/classify"),
        ):
            task = request.tasks.add(method_name=method)
            task.model_spec.name = "m"
            task.model_spec.signature_name = name
    else:
        request = getattr(log, kind).request
        request.model_spec.signature_name = signature
    example = request.input.example_list.examples.add()
    example.features.feature["x"].float_list.value.append(1.0)
    return log.SerializeToString()


def test_warmup_replays_classify_regress_and_multi_inference_records(start_server, tmp_path):
    base = tmp_path / "m"
    shutil.copytree(HALF_PLUS_TWO, base)
    write_warmup(
        base / "00000123",
        [
            example_warmup("classify_log", "classify_x_to_y"),
            example_warmup("regress_log", "regress_x_to_y"),
            example_warmup("multi_inference_log", "regress_x_to_y2"),
        ],
    )
    server = start_server("--model_name=m", f"--model_base_path={base}")
    assert "Number of warmup records read: 3." in server.output()
    assert statuses(server, "m") == [(123, "AVAILABLE", "OK")]


@pytest.mark.parametrize(
    "record, message",
    [
        (
            example_warmup("classify_log", "regress_x_to_y"),
            "INVALID_ARGUMENT: Expected classification signature outputs to contain at least one of "
            '"classes" or "scores".',
        ),
        (
            prediction_log_pb2.PredictionLog(session_run_log={}).SerializeToString(),
            "UNIMPLEMENTED: Unsupported log_type for warmup: 5",
        ),
    ],
)
def test_bad_example_warmup_fails_the_load(tmp_path, record, message):
    base = tmp_path / "m"
    shutil.copytree(HALF_PLUS_TWO, base)
    write_warmup(base / "00000123", [record])
    result = run_cli(
        "--model_name=m",
        f"--model_base_path={base}",
        "--max_num_load_retries=0",
        "--port=0",
        "--grpc_socket_path=" + str(tmp_path / "s"),
    )
    assert result.returncode == 255
    assert "{name: m version: 123} due to error: " + message in result.stdout
