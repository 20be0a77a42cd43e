"""Models on Azure Blob Storage: Azurite (npm's azurite, run by node on a free port) and the real pyserving.

Serving from az://, a hot swap under traffic (zero failed requests), a partial upload, a rollback; a missing
container beside serving models; a wrong account key; Azurite stopped and started again under a serving model.
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
    store_outage_and_recovery,
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

    def __init__(self, log_path: Path, workdir: Path, port: int = 0) -> None:
        port = port or free_port()
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


def test_azure_wrong_account_key_is_the_models_error(start_server, azure, tmp_path, monkeypatch):
    """The key comes from the environment at start: the server's is wrong, so its remote model shows the
    store's authentication error while the local model keeps serving."""
    azure.fs.mkdir("models")
    azure.upload(VERSION, "remote/1")
    wrong_key = "A" * 86 + "=="
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azure.connection_string.replace(ACCOUNT_KEY, wrong_key))
    local = tmp_path / "local"
    local.mkdir()
    (local / "1").symlink_to(VERSION)
    models = [{"name": "local", "path": local}, {"name": "remote", "path": "az://models/remote"}]
    config = write_config(tmp_path / "models.config", models[0])
    server = start_server(
        f"--model_config_file={config}",
        "--model_config_file_poll_wait_seconds=1",
        f"--model_cache_dir={tmp_path / 'cache'}",
        "--file_system_poll_wait_seconds=1",
    )
    write_config(config, *models)
    expected = (
        404,
        "Could not find any versions of model remote: Could not list base path az://models/remote: "
        "HttpResponseError: Server failed to authenticate the request. Make sure the value of the Authorization "
        "header is formed correctly including the signature.",
    )
    wait_for(lambda: "Could not list" in model_error(server, "remote")[1], timeout=30, what="remote's error")
    assert model_error(server, "remote") == expected
    with grpc.insecure_channel(server.grpc) as channel:
        assert list(grpc_predict(channel, "local", x=[2.0]).outputs["y"].float_val) == [3.0]
    assert statuses(server, "local") == [(1, "AVAILABLE", "OK")]
    assert server.stop() == 0


def test_azure_outage_leaves_models_serving_and_recovers(start_server, azure, tmp_path):
    azure.fs.mkdir("models")
    port = azure.port
    restarted: list[Azurite] = []

    def restart() -> Azurite:
        workdir = tmp_path / "azurite-restarted"
        workdir.mkdir()
        restarted.append(Azurite(tmp_path / "azurite-restarted.log", workdir, port))
        restarted[0].fs.mkdir("models")
        return restarted[0]

    error = (
        f"ServiceRequestError: Cannot connect to host 127.0.0.1:{port} ssl:default "
        f"[Connect call failed ('127.0.0.1', {port})]"
    )
    try:
        store_outage_and_recovery(start_server, azure, restart, "az", tmp_path, error)
    finally:
        for store in restarted:
            store.stop()


def model_error(server, name: str) -> tuple[int, str]:
    r = requests.get(f"{server.rest}/v1/models/{name}", timeout=10)
    return r.status_code, r.json().get("error", "")
