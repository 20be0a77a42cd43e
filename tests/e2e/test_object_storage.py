"""Models on S3: a real S3 server (moto in server mode, a subprocess on a free port) and the real pyserving.

Serving from s3://, a hot swap under traffic, a rollback, a partial upload, a config file mixing local and S3
models, a missing bucket, a network error and bad credentials.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
import pytest
import requests
from helpers import (
    HALF_PLUS_TWO,
    StoreEmulator,
    free_port,
    grpc_predict,
    statuses,
    swap_and_roll_back,
    wait_for,
    write_config,
    write_warmup,
)

boto3 = pytest.importorskip("boto3", reason="the S3 tests need pyserving[s3] and moto[server] (pip install .[test])")
pytest.importorskip("s3fs", reason="the S3 tests need pyserving[s3] (pip install .[s3])")
pytest.importorskip("moto", reason="the S3 tests need moto[server] (pip install .[test])")

VERSION = HALF_PLUS_TWO / "00000123"
KEY, SECRET = "testing", "testing"


class S3Server(StoreEmulator):
    """moto_server on a free 127.0.0.1 port; `client` talks to it with boto3; uploads go to `bucket`."""

    def __init__(self, log_path: Path, key: str = KEY, secret: str = SECRET, bucket: str = "models") -> None:
        port = free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        super().__init__(command, port, self.endpoint, log_path)
        self.client = self.make_client(key, secret)
        self.bucket = bucket

    def make_client(self, key: str, secret: str):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key,
            aws_secret_access_key=secret,
        )

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def delete(self, prefix: str) -> None:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix + "/").get("Contents", [])
        for item in listed:
            self.client.delete_object(Bucket=self.bucket, Key=item["Key"])


@pytest.fixture()
def s3(tmp_path, monkeypatch):
    server = S3Server(tmp_path / "moto.log")
    # What the pyserving subprocess inherits: TF's S3 variables and AWS credentials.
    monkeypatch.setenv("S3_ENDPOINT", f"127.0.0.1:{server.port}")
    monkeypatch.setenv("S3_USE_HTTPS", "0")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    yield server
    server.stop()


def model_error(server, name: str) -> tuple[int, str]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    return r.status_code, r.json().get("error", "")


def test_s3_model_swaps_and_rolls_back_under_traffic(start_server, s3, tmp_path):
    s3.client.create_bucket(Bucket="models")
    swap_and_roll_back(start_server, s3, "s3://models/half_plus_two", "half_plus_two", tmp_path / "cache", "S3")


def test_s3_and_local_models_in_one_config_survive_store_faults(start_server, s3, tmp_path):
    s3.client.create_bucket(Bucket="models")
    s3.upload(VERSION, "deep/path/remote/7")
    local = tmp_path / "local"
    local.mkdir()
    (local / "3").symlink_to(VERSION)
    config = tmp_path / "models.config"
    remote = {"name": "remote", "path": "s3://models/deep/path/remote"}
    write_config(config, {"name": "local", "path": local}, remote)
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=1",
        f"--model_cache_dir={tmp_path / 'cache'}",
        "--file_system_poll_wait_seconds=1",
    )
    assert statuses(server, "local") == [(3, "AVAILABLE", "OK")]
    assert statuses(server, "remote") == [(7, "AVAILABLE", "OK")]

    # A model in a bucket that does not exist: its status says why; the others serve on.
    write_config(config, {"name": "local", "path": local}, remote, {"name": "nobucket", "path": "s3://no-such/m"})
    expected = (
        404,
        "Could not find any versions of model nobucket: Could not list base path s3://no-such/m: "
        "FileNotFoundError: The specified bucket does not exist",
    )
    wait_for(lambda: model_error(server, "nobucket") == expected, timeout=30, what="nobucket's error")
    with grpc.insecure_channel(server.grpc) as channel:
        for name in ("local", "remote"):
            assert list(grpc_predict(channel, name, x=[2.0]).outputs["y"].float_val) == [3.0]

        # The store goes away (a network error): what serves keeps serving, the error is logged, polls go on.
        s3.stop()
        wait_for(
            lambda: "Could not list base path s3://models/deep/path/remote" in server.output(),
            timeout=60,
            what="the listing error",
        )
        for name in ("local", "remote"):
            assert list(grpc_predict(channel, name, x=[2.0]).outputs["y"].float_val) == [3.0]
        assert statuses(server, "remote") == [(7, "AVAILABLE", "OK")]
        ready = requests.get(f"{server.rest}/readyz", timeout=10).json()
        assert ready == {
            "ready": False,
            "models": {"local": "AVAILABLE", "nobucket": "NOT_AVAILABLE", "remote": "AVAILABLE"},
        }
        # A new local version still loads while the store is down (the poll is not stuck).
        (local / "4").symlink_to(VERSION)
        wait_for(lambda: statuses(server, "local") == [(4, "AVAILABLE", "OK"), (3, "END", "OK")], what="local/4")
    assert server.stop() == 0


def test_s3_bad_credentials_show_in_the_status_and_are_retried(start_server, s3, tmp_path, monkeypatch):
    # moto checks credentials once told to: an IAM user with S3 rights first, then authentication on.
    iam = boto3.client(
        "iam", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id=KEY, aws_secret_access_key=SECRET
    )
    iam.create_user(UserName="deployer")
    iam.put_user_policy(
        UserName="deployer",
        PolicyName="s3",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="deployer")["AccessKey"]
    deployer = s3.make_client(key["AccessKeyId"], key["SecretAccessKey"])
    assert requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"0", timeout=10).status_code == 200
    s3.client = deployer
    deployer.create_bucket(Bucket="models")
    s3.upload(VERSION, "m/1")

    # The server signs with the right key id and a wrong secret.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    local = tmp_path / "local"
    local.mkdir()
    (local / "1").symlink_to(VERSION)
    config = write_config(tmp_path / "models.config", {"name": "local", "path": local})
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=1",
        f"--model_cache_dir={tmp_path / 'cache'}",
        "--file_system_poll_wait_seconds=1",
    )
    write_config(config, {"name": "local", "path": local}, {"name": "m", "path": "s3://models/m"})
    wait_for(lambda: "Could not list base path s3://models/m" in model_error(server, "m")[1], what="m's error")
    assert model_error(server, "m") == (
        404,
        "Could not find any versions of model m: Could not list base path s3://models/m: PermissionError: The "
        "request signature we calculated does not match the signature you provided. Check your key and signing "
        "method.",
    )
    assert statuses(server, "local") == [(1, "AVAILABLE", "OK")]

    # The store accepts anyone again: the next polls list, copy and load the model (no restart).
    assert requests.post(f"{s3.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).status_code == 200
    wait_for(lambda: statuses(server, "m") == [(1, "AVAILABLE", "OK")], timeout=60, what="m after the fix")
    with grpc.insecure_channel(server.grpc) as channel:
        assert list(grpc_predict(channel, "m", x=[2.0]).outputs["y"].float_val) == [3.0]
    assert server.stop() == 0


def test_s3_onnx_model_is_detected_and_copied_with_its_warmup_without_polling(start_server, s3, tmp_path):
    pytest.importorskip("onnxruntime")
    from onnx_models import export_onnx_scaler
    from tensorflow_serving.apis import prediction_log_pb2

    local = tmp_path / "scaler"
    export_onnx_scaler(local, 2)
    warmup = prediction_log_pb2.PredictionLog()
    warmup.predict_log.request.inputs["x"].float_val.extend([1, 2, 3])
    warmup.predict_log.request.inputs["x"].dtype = 1  # DT_FLOAT
    warmup.predict_log.request.inputs["x"].tensor_shape.dim.add(size=1)
    warmup.predict_log.request.inputs["x"].tensor_shape.dim.add(size=3)
    warmup.predict_log.request.inputs["k"].int64_val.append(1)
    warmup.predict_log.request.inputs["k"].dtype = 9  # DT_INT64
    warmup.predict_log.request.inputs["k"].tensor_shape.dim.add(size=1)
    write_warmup(local / "2", [warmup.SerializeToString()])
    s3.client.create_bucket(Bucket="models")
    s3.upload(local / "2", "scaler/2")
    cache = tmp_path / "cache"
    # No --model_platform (model.onnx in the listing says onnx) and no polling (a second listing a second later).
    server = start_server(
        "--model_name=scaler",
        "--model_base_path=s3://models/scaler",
        f"--model_cache_dir={cache}",
        "--file_system_poll_wait_seconds=0",
    )
    assert statuses(server, "scaler") == [(2, "AVAILABLE", "OK")]
    assert "Finished reading warmup data for model at " in server.output()
    (copy,) = cache.iterdir()
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
        "2/assets.extra/tf_serving_warmup_requests",
        "2/model.onnx",
    ]
    r = requests.post(
        f"{server.rest}/v1/models/scaler:predict", json={"instances": [{"x": [1.0, 2.0, 3.0], "k": 1}]}, timeout=30
    )
    assert (r.status_code, r.json()) == (200, {"predictions": [{"scaled": [2.0, 4.0, 6.0], "total": 6.0, "next": 2}]})
    assert server.stop() == 0
