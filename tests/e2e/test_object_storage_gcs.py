"""Models on GCS: the gcp-storage-emulator (a subprocess on a free port) and the real pyserving.

Serving from gs://, a hot swap under traffic (zero failed requests), a partial upload, a rollback; a missing
bucket beside serving models.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import requests
from helpers import HALF_PLUS_TWO, Traffic, free_port, grpc_predict, statuses, wait_for, write_config

gcsfs_core = pytest.importorskip("gcsfs.core", reason="the GCS tests need pyserving[gcs] (pip install .[test])")
pytest.importorskip("gcp_storage_emulator", reason="the GCS tests need gcp-storage-emulator (pip install .[test])")

VERSION = HALF_PLUS_TWO / "00000123"


class GcsEmulator:
    """gcp-storage-emulator in memory on a free 127.0.0.1 port, with the bucket `models`."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log = open(log_path, "wb")
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1"]
        self.proc = subprocess.Popen(
            [*command, f"--port={self.port}", "--in-memory", "--default-bucket=models"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{self.endpoint}/storage/v1/b", timeout=2)
                break
            except requests.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"gcp-storage-emulator did not start:\n{log_path.read_text()}") from None
                time.sleep(0.1)
        # The JSON-API class: gcsfs's default one asks a gRPC control plane the emulator lacks.
        self.fs = gcsfs_core.GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True)

    def upload(self, local: Path, prefix: str, only=None) -> None:
        files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == "saved_model.pb")
        for path in files:
            name = path.relative_to(local).as_posix()
            if only is None or only(name):
                self.fs.pipe(f"{prefix}/{name}", path.read_bytes())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def cached(cache: Path) -> list[str]:
    return sorted(p.name for model in cache.iterdir() for p in model.iterdir()) if cache.is_dir() else []


@pytest.fixture()
def gcs(tmp_path, monkeypatch):
    emulator = GcsEmulator(tmp_path / "gcs.log")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield emulator
    emulator.stop()


def test_gcs_model_swaps_and_rolls_back_under_traffic(start_server, gcs, tmp_path):
    gcs.upload(VERSION, "models/half_plus_two/1")
    cache = tmp_path / "cache"
    server = start_server(
        "--model_name=m",
        "--model_base_path=gs://models/half_plus_two",
        f"--model_cache_dir={cache}",
        "--file_system_poll_wait_seconds=1",
    )
    assert statuses(server, "m") == [(1, "AVAILABLE", "OK")]
    traffic = Traffic(server, "m")
    try:
        wait_for(lambda: traffic.serving(1), what="traffic")
        gcs.upload(VERSION, "models/half_plus_two/2", only=lambda name: name != "saved_model.pb")
        time.sleep(3.5)
        assert statuses(server, "m") == [(1, "AVAILABLE", "OK")]
        gcs.upload(VERSION, "models/half_plus_two/2", only=lambda name: name == "saved_model.pb")
        uploaded = time.monotonic()
        wait_for(lambda: statuses(server, "m") == [(2, "AVAILABLE", "OK"), (1, "END", "OK")], what="the swap")
        swap_s = time.monotonic() - uploaded
        wait_for(lambda: traffic.serving(2), what="traffic on version 2")
        wait_for(lambda: cached(cache) == ["2"], what="version 1's cache to go")
        gcs.fs.rm("models/half_plus_two/2", recursive=True)
        wait_for(lambda: statuses(server, "m") == [(2, "END", "OK"), (1, "AVAILABLE", "OK")], what="rollback")
        wait_for(lambda: traffic.serving(1), what="traffic on version 1 again")
        wait_for(lambda: cached(cache) == ["1"], what="version 2's cache to go")
    finally:
        traffic.stop()
    failed = len(traffic.failures)
    print(f"\nGCS swap: upload finished -> 2 AVAILABLE, 1 END {swap_s:.2f} s; sent {traffic.sent}, failed {failed}")
    assert traffic.failures == []
    assert server.stop() == 0


def test_gcs_faults_leave_the_other_models_serving(start_server, gcs, tmp_path):
    gcs.upload(VERSION, "models/remote/1")
    local = tmp_path / "local"
    local.mkdir()
    (local / "1").symlink_to(VERSION)
    models = [
        {"name": "local", "path": local},
        {"name": "remote", "path": "gs://models/remote"},
        {"name": "nobucket", "path": "gs://no-such/m"},
    ]
    config = write_config(tmp_path / "models.config", *models[:2])
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=1",
        f"--model_cache_dir={tmp_path / 'cache'}",
        "--file_system_poll_wait_seconds=1",
    )
    assert statuses(server, "remote") == [(1, "AVAILABLE", "OK")]
    write_config(config, *models)
    expected = (
        404,
        "Could not find any versions of model nobucket: Could not list base path gs://no-such/m: "
        "FileNotFoundError: b/no-such/o",
    )
    wait_for(lambda: model_error(server, "nobucket") == expected, timeout=30, what="nobucket's error")
    with grpc.insecure_channel(server.grpc) as channel:
        for name in ("local", "remote"):
            assert list(grpc_predict(channel, name, x=[2.0]).outputs["y"].float_val) == [3.0]
    assert statuses(server, "remote") == [(1, "AVAILABLE", "OK")]
    assert server.stop() == 0


def model_error(server, name: str) -> tuple[int, str]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    return r.status_code, r.json().get("error", "")
