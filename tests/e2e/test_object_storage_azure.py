"""Models on Azure Blob Storage: Azurite (npm's azurite, run by node on a free port) and the real pyserving.

Serving from az://, a hot swap under traffic (zero failed requests), a partial upload, a rollback; a missing
container beside serving models.
Azurite comes from `bin/install --test` (.venvs/azurite), or from $AZURITE_BLOB (the azurite-blob program).
"""

from __future__ import annotations

import os
import shutil
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
)

adlfs = pytest.importorskip("adlfs", reason="the Azure tests need pyserving[azure] (pip install .[test])")

VERSION = HALF_PLUS_TWO / "00000123"
_REPO = Path(__file__).resolve().parents[2]
AZURITE = os.environ.get("AZURITE_BLOB") or str(_REPO / ".venvs" / "azurite" / "node_modules" / ".bin" / "azurite-blob")
# Azurite's fixed development account (its documented, public key).
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azurite(StoreEmulator):
    """azurite-blob in memory on a free 127.0.0.1 port; uploads go to the container `models`."""

    def __init__(self, log_path: Path, workdir: Path) -> None:
        port = free_port()
        self.connection_string = (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT};"
        )
        command = [AZURITE, "--blobHost=127.0.0.1", f"--blobPort={port}", "--inMemoryPersistence"]
        command += ["--skipApiVersionCheck", "--silent"]
        super().__init__(command, port, f"http://127.0.0.1:{port}/", log_path, cwd=workdir)
        self.fs = adlfs.AzureBlobFileSystem(connection_string=self.connection_string, skip_instance_cache=True)

    def put(self, key: str, data: bytes) -> None:
        self.fs.pipe(f"models/{key}", data)

    def delete(self, prefix: str) -> None:
        self.fs.rm(f"models/{prefix}", recursive=True)


@pytest.fixture()
def azure(tmp_path, monkeypatch):
    if not (os.access(AZURITE, os.X_OK) and shutil.which("node")):
        pytest.skip(f"Azurite is not installed at {AZURITE} (bin/install --test installs it; it needs node)")
    workdir = tmp_path / "azurite"
    workdir.mkdir()
    server = Azurite(tmp_path / "azurite.log", workdir)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", server.connection_string)
    yield server
    server.stop()


def test_azure_model_swaps_and_rolls_back_under_traffic(start_server, azure, tmp_path):
    azure.fs.mkdir("models")
    swap_and_roll_back(start_server, azure, "az://models/half_plus_two", "half_plus_two", tmp_path / "cache", "Azure")


def test_azure_faults_leave_the_other_models_serving(start_server, azure, tmp_path):
    azure.fs.mkdir("models")
    azure.upload(VERSION, "remote/1")
    local = tmp_path / "local"
    local.mkdir()
    (local / "1").symlink_to(VERSION)
    models = [
        {"name": "local", "path": local},
        {"name": "remote", "path": "az://models/remote"},
        {"name": "nocontainer", "path": "az://no-such/m"},
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
        "Could not find any versions of model nocontainer: Could not list base path az://no-such/m: "
        "no object under the base path",
    )
    wait_for(lambda: model_error(server, "nocontainer") == expected, timeout=30, what="nocontainer's error")
    with grpc.insecure_channel(server.grpc) as channel:
        for name in ("local", "remote"):
            assert list(grpc_predict(channel, name, x=[2.0]).outputs["y"].float_val) == [3.0]
    assert statuses(server, "remote") == [(1, "AVAILABLE", "OK")]
    assert server.stop() == 0


def model_error(server, name: str) -> tuple[int, str]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    return r.status_code, r.json().get("error", "")
