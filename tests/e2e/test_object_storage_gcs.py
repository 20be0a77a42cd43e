"""Models on GCS: the gcp-storage-emulator (a subprocess on a free port) and the real pyserving.

Serving from gs://, a hot swap under traffic (zero failed requests), a partial upload, a rollback; a missing
bucket beside serving models; the emulator stopped and started again under a serving model.
The emulator does not check credentials (any token, or none, is accepted), so there is no bad-credentials
test for GCS here; the Azure tests have one (Azurite checks its account key).
"""

from __future__ import annotations

import socket
import sys
import time
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
    store_outage_and_recovery,
    swap_and_roll_back,
    wait_for,
    write_config,
)

gcsfs_core = pytest.importorskip("gcsfs.core", reason="the GCS tests need pyserving[gcs] (pip install .[test])")
pytest.importorskip("gcp_storage_emulator", reason="the GCS tests need gcp-storage-emulator (pip install .[test])")

VERSION = HALF_PLUS_TWO / "00000123"


class GcsEmulator(StoreEmulator):
    """gcp-storage-emulator in memory on a free 127.0.0.1 port, with the bucket `models`."""

    def __init__(self, log_path: Path, port: int = 0) -> None:
        port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1"]
        command += [f"--port={port}", "--in-memory", "--default-bucket=models"]
        super().__init__(command, port, f"{self.endpoint}/storage/v1/b", log_path)
        # The JSON-API class: gcsfs's default one asks a gRPC control plane the emulator lacks.
        self.fs = gcsfs_core.GCSFileSystem(endpoint_url=self.endpoint, token="anon", skip_instance_cache=True)

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe(f"models/{key}", data)

    def delete(self, prefix: str) -> None:
        self.fs.rm(f"models/{prefix}", recursive=True)


@pytest.fixture()
def gcs(tmp_path, monkeypatch):
    emulator = GcsEmulator(tmp_path / "gcs.log")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.endpoint)
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    yield emulator
    emulator.stop()


def test_gcs_model_swaps_and_rolls_back_under_traffic(start_server, gcs, tmp_path):
    swap_and_roll_back(start_server, gcs, "gs://models/half_plus_two", "half_plus_two", tmp_path / "cache", "GCS")


def test_gcs_faults_leave_the_other_models_serving(start_server, gcs, tmp_path):
    gcs.upload(VERSION, "remote/1")
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


def test_gcs_outage_leaves_models_serving_and_recovers(start_server, gcs, tmp_path):
    port = gcs.port
    error = (
        f"ClientConnectorError: Cannot connect to host 127.0.0.1:{port} ssl:default "
        f"[Connect call failed ('127.0.0.1', {port})]"
    )
    restarted: list[GcsEmulator] = []

    def restart() -> GcsEmulator:
        restarted.append(GcsEmulator(tmp_path / "gcs-restarted.log", port))
        return restarted[0]

    try:
        store_outage_and_recovery(start_server, gcs, restart, "gs", tmp_path, error)
    finally:
        for store in restarted:
            store.stop()


def test_a_listing_that_gets_no_answer_is_abandoned_at_the_deadline(monkeypatch, tmp_path):
    """A port that accepts connections (the kernel's backlog) and never answers: the listing is cancelled at
    the listing deadline (every store's; 60 s in the server, 2 s here) and reported in one line."""
    from pyserving.lifecycle import storage

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setattr(storage, "_LIST_DEADLINE_S", 2)
        started = time.monotonic()
        with pytest.raises(storage.StorageError) as caught:
            storage.RemoteStore(str(tmp_path)).complete_versions("m", "gs://models/m")
        elapsed = time.monotonic() - started
    assert str(caught.value) == "the listing took more than 2 s (abandoned)"
    assert 2 <= elapsed < 4


def model_error(server, name: str) -> tuple[int, str]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    return r.status_code, r.json().get("error", "")
