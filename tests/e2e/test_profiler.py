"""tensorflow.ProfilerService on the gRPC port and the unix socket: TensorFlow's own profiler client
collects a trace of the model being served; raw calls cover the socket, Terminate, one session at a
time, bad requests and `--enable_profiler=false`."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import tensorflow as tf
from helpers import HALF_PLUS_TWO, Traffic, grpc_predict, wait_for
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from pyserving.protocols.profiler import message_class

ProfileRequest = message_class("ProfileRequest")
ProfileResponse = message_class("ProfileResponse")
TerminateRequest = message_class("TerminateRequest")
TerminateResponse = message_class("TerminateResponse")
MonitorRequest = message_class("MonitorRequest")
MonitorResponse = message_class("MonitorResponse")

# What half_plus_two's graph runs for each predict (TF's host tracer names them node:Op).
_MODEL_OPS = {"mul:Mul", "add:AddV2"}


@pytest.fixture(scope="module")
def server(start_server, tmp_path_factory):
    socket_path = tmp_path_factory.mktemp("profiler-socket") / "grpc.sock"
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", f"--grpc_socket_path={socket_path}"
    )
    server.socket = f"unix:{socket_path}"
    assert "Profiler service is enabled" in server.output()
    return server


@pytest.fixture()
def traffic(server):
    """Predict requests over REST and gRPC while the test profiles; none may fail."""
    traffic = Traffic(server, "half_plus_two")
    yield traffic
    traffic.stop()
    assert traffic.failures == []
    assert traffic.sent > 0


def _rpc(channel, method: str, response_class):
    return channel.unary_unary(
        f"/tensorflow.ProfilerService/{method}",
        request_serializer=lambda message: message if isinstance(message, bytes) else message.SerializeToString(),
        response_deserializer=response_class.FromString,
    )


def _request(root, session_id: str = "run", host_name: str = "host", duration_ms: int = 500, **fields):
    request = ProfileRequest(
        repository_root=str(root), session_id=session_id, host_name=host_name, duration_ms=duration_ms, **fields
    )
    request.opts.version = 1
    request.opts.host_tracer_level = 2
    request.opts.duration_ms = duration_ms
    return request


def _op_names(xspace_bytes: bytes) -> set[str]:
    space = xplane_pb2.XSpace.FromString(xspace_bytes)
    (host,) = [plane for plane in space.planes if plane.name == "/host:CPU"]
    return {metadata.name for metadata in host.event_metadata.values()}


def test_tf_profiler_client_traces_the_served_model(server, traffic, tmp_path):
    logdir = tmp_path / "logdir"
    tf.profiler.experimental.client.trace(f"grpc://{server.grpc}", str(logdir), 1000)
    (run,) = (logdir / "plugins" / "profile").iterdir()
    assert [path.name for path in run.iterdir()] == [f"127.0.0.1_{server.grpc_port}.xplane.pb"]
    assert _MODEL_OPS <= _op_names((run / f"127.0.0.1_{server.grpc_port}.xplane.pb").read_bytes())


def test_profile_through_the_unix_socket(server, traffic, tmp_path):
    # TF's client accepts only host:port addresses ('Could not interpret "unix:..." as a host-port pair'),
    # so the socket is profiled with a raw call, as the client would send it.
    with grpc.insecure_channel(server.socket) as channel:
        response = _rpc(channel, "Profile", ProfileResponse)(_request(tmp_path, "run_1", "localhost:0"), timeout=60)
    assert response.empty_trace is False
    assert response.xspace == b""
    assert [path.name for path in (tmp_path / "run_1").iterdir()] == ["localhost_0.xplane.pb"]
    assert _MODEL_OPS <= _op_names((tmp_path / "run_1" / "localhost_0.xplane.pb").read_bytes())


def test_emit_xspace_answers_the_trace_and_writes_nothing(server, traffic, tmp_path):
    with grpc.insecure_channel(server.grpc) as channel:
        response = _rpc(channel, "Profile", ProfileResponse)(
            _request(tmp_path / "unused", emit_xspace=True), timeout=60
        )
    assert response.empty_trace is False
    assert _MODEL_OPS <= _op_names(response.xspace)
    assert not (tmp_path / "unused").exists()


def test_one_session_at_a_time_and_terminate_ends_it_early(server, traffic, tmp_path):
    with grpc.insecure_channel(server.grpc) as channel, ThreadPoolExecutor(1) as pool:
        profile = _rpc(channel, "Profile", ProfileResponse)
        started = time.monotonic()
        long = pool.submit(profile, _request(tmp_path, "long", duration_ms=120_000), timeout=60)
        wait_for(lambda: "Profiler session 'long' started for 120000 ms" in server.output(), 30, "the session")
        with pytest.raises(grpc.RpcError) as second:
            profile(_request(tmp_path, "second"), timeout=30)
        assert second.value.code() == grpc.StatusCode.INTERNAL
        assert second.value.details() == "Another profiling session active."
        assert _rpc(channel, "Terminate", TerminateResponse)(TerminateRequest(session_id="other"), timeout=10) == (
            TerminateResponse()
        )
        assert not long.done()
        assert _rpc(channel, "Terminate", TerminateResponse)(TerminateRequest(session_id="long"), timeout=10) == (
            TerminateResponse()
        )
        assert long.result(timeout=30).empty_trace is False
        assert time.monotonic() - started < 60
    assert [path.name for path in (tmp_path / "long").iterdir()] == ["host.xplane.pb"]
    assert not (tmp_path / "second").exists()
    # The profiler is free again.
    with grpc.insecure_channel(server.grpc) as channel:
        _rpc(channel, "Profile", ProfileResponse)(_request(tmp_path, "after", duration_ms=100), timeout=60)
    assert (tmp_path / "after" / "host.xplane.pb").stat().st_size > 0


def test_a_client_that_gives_up_frees_the_profiler(server, tmp_path):
    with grpc.insecure_channel(server.grpc) as channel:
        profile = _rpc(channel, "Profile", ProfileResponse)
        with pytest.raises(grpc.RpcError) as error:
            profile(_request(tmp_path, "forever", duration_ms=2**64 - 1), timeout=2)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The cancelled session stops (its trace is dropped) and the next one may start.
        wait_for(lambda: _try_profile(profile, _request(tmp_path, "next", duration_ms=100)), 30, "the profiler")
    assert [path.name for path in tmp_path.iterdir()] == ["next"]


def _try_profile(profile, request) -> bool:
    try:
        profile(request, timeout=30)
    except grpc.RpcError as error:
        assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "Another profiling session active.")
        return False
    return True


@pytest.mark.parametrize(
    ("case", "code", "details"),
    [
        (
            "empty root",
            grpc.StatusCode.INVALID_ARGUMENT,
            "ProfileRequest.repository_root is empty; nowhere to write the trace",
        ),
        (
            "session escapes",
            grpc.StatusCode.INVALID_ARGUMENT,
            "ProfileRequest.session_id '../escape' is not a plain file name",
        ),
        (
            "host with slash",
            grpc.StatusCode.INVALID_ARGUMENT,
            "ProfileRequest.host_name 'a/b' is not a plain file name",
        ),
        ("root with NUL", grpc.StatusCode.INVALID_ARGUMENT, "ProfileRequest.repository_root contains a NUL byte"),
        ("root is a file", grpc.StatusCode.INTERNAL, "{root}/file/run; Not a directory"),
        ("unparsable", grpc.StatusCode.INVALID_ARGUMENT, "Failed to parse the request as tensorflow.ProfileRequest"),
    ],
)
def test_bad_profile_requests_get_clear_errors(server, tmp_path, case, code, details):
    (tmp_path / "file").write_bytes(b"not a folder")
    request = {
        "empty root": _request(""),
        "session escapes": _request(tmp_path, "../escape"),
        "host with slash": _request(tmp_path, host_name="a/b"),
        "root with NUL": _request(f"{tmp_path}/a\0b"),
        "root is a file": _request(tmp_path / "file", duration_ms=100),
        "unparsable": b"\xff\xff\xff",
    }[case]
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            _rpc(channel, "Profile", ProfileResponse)(request, timeout=60)
        assert error.value.code() == code
        assert error.value.details() == details.format(root=tmp_path)
        assert list(grpc_predict(channel, "half_plus_two", x=[2.0]).outputs["y"].float_val) == [3.0]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file"]


def test_monitor_is_unimplemented_as_in_tensorflow(server):
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            _rpc(channel, "Monitor", MonitorResponse)(MonitorRequest(duration_ms=100), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error.value.details() == "unimplemented."


def test_enable_profiler_false_leaves_the_service_unmounted(start_server, tmp_path):
    server = start_server(
        "--model_name=half_plus_two", f"--model_base_path={HALF_PLUS_TWO}", "--enable_profiler=false", rest=False
    )
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as error:
            _rpc(channel, "Profile", ProfileResponse)(_request(tmp_path), timeout=10)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert error.value.details() == "Method not found!"
        assert list(grpc_predict(channel, "half_plus_two", x=[2.0]).outputs["y"].float_val) == [3.0]
    assert list(tmp_path.iterdir()) == []
    assert "Profiler service is enabled" not in server.output()
    assert "Flag --enable_profiler" not in server.output()
