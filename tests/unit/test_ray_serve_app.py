"""pyserving.ray_serve without a cluster: the builder's arguments, max_ongoing_requests, the replica header."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install pyserving[ray])")

from pyserving import ray_serve


def test_max_ongoing_requests_holds_full_batches(tmp_path):
    params = tmp_path / "batching.pbtxt"
    params.write_text("max_batch_size { value: 32 } num_batch_threads { value: 3 }")
    args = {"model_name": "m", "model_base_path": "/m", "enable_batching": "true"}
    # Three batches running and one filling, of 32 requests each.
    assert ray_serve.deployment_options({**args, "batching_parameters_file": str(params)}) == {
        "max_ongoing_requests": 128,
        "num_replicas": 1,
    }
    # TF Serving's default max_batch_size (1000) would be 1000 per thread: capped.
    assert ray_serve.deployment_options(args)["max_ongoing_requests"] == 2048
    assert ray_serve.deployment_options({"model_name": "m", "model_base_path": "/m"})["max_ongoing_requests"] == 32
    given = {**args, "max_ongoing_requests": "7", "num_replicas": "3"}
    assert ray_serve.deployment_options(given) == {"max_ongoing_requests": 7, "num_replicas": 3}


def test_autoscaling_options():
    args = {"model_name": "m", "model_base_path": "/m", "max_replicas": "4", "upscale_delay_s": "2"}
    assert ray_serve.deployment_options(args) == {
        "max_ongoing_requests": 32,
        "autoscaling_config": {
            "min_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": 16.0,
            "upscale_delay_s": 2.0,
        },
    }


def test_bad_arguments_fail_in_the_builder():
    with pytest.raises(ValueError, match="^pyserving.ray_serve: unknown argument: --model_nam=m$"):
        ray_serve.app({"model_nam": "m"})
    with pytest.raises(ValueError, match="^pyserving.ray_serve: Couldn't interpret value x for flag port.$"):
        ray_serve.app({"port": "x"})
    with pytest.raises(ValueError, match="^pyserving.ray_serve: Couldn't interpret value 1.5 for flag port.$"):
        ray_serve.app({"port": 1.5, "enable_batching": True})  # YAML's types: 1.5 stays 1.5, True is true


def test_replica_header_and_lifespan():
    async def router(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    app = ray_serve._ReplicaHeader(router, "abc123")
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def run() -> None:
        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

        async def receive():
            return next(messages)

        await app({"type": "lifespan"}, receive, send)
        await app({"type": "http", "path": "/"}, receive, send)

    asyncio.run(run())
    assert sent == [
        {"type": "lifespan.startup.complete"},
        {"type": "lifespan.shutdown.complete"},
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"x-pyserving-replica", b"abc123")],
        },
        {"type": "http.response.body", "body": b"ok"},
    ]
