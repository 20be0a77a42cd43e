"""Warmup: replay `assets.extra/tf_serving_warmup_requests` on a version before it serves.

The file is a TFRecord of serialized `PredictionLog`s, as TF Serving reads it;
any failure fails the load, so a version that cannot answer its own warmup
requests never becomes AVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator

import tensorflow as tf
from tensorflow.python.util import deprecation
from tensorflow_serving.apis import prediction_log_pb2

from pyserving import metrics, tensors
from pyserving.errors import Code, ServingError, c_escape, invalid_argument
from pyserving.protocols.tfs.protos import model_spec
from pyserving.serving import DataPlane, Target

__all__ = ["MAX_RECORDS", "WARMUP_FILE", "replay"]

log = logging.getLogger("pyserving")

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
MAX_RECORDS = 1000


def replay(path: str, target: Target, dataplane: DataPlane, iterations: int) -> None:
    """Run every warmup record of the version at `path` on `target` `iterations` times (at least once) in a row.

    Called from a load thread; the records run through the data plane like requests.
    """
    file = os.path.join(path, WARMUP_FILE)
    if not os.path.exists(file):
        log.info("No warmup data file found at %s", file)
        return
    log.info(
        "Starting to read warmup data for model at %s with model-warmup-options num_request_iterations: %d",
        file,
        max(iterations, 1),
    )
    started = time.monotonic()
    count, status = 0, Code.OK
    loop = asyncio.new_event_loop()  # predict is a coroutine; this load thread has no loop of its own
    try:
        for raw in _records(file):
            try:
                record = prediction_log_pb2.PredictionLog.FromString(raw)
            except Exception:
                raise invalid_argument(f"Failed to parse warmup record: {c_escape(raw[:64])} from {file}") from None
            for _ in range(max(iterations, 1)):
                _run(record, target, dataplane, loop)
            count += 1
            if count > MAX_RECORDS:
                raise invalid_argument(f"Number of warmup records exceeds the maximum ({MAX_RECORDS}) at {file}")
    except tf.errors.DataLossError as exc:
        status = Code.DATA_LOSS
        raise ServingError(
            Code.DATA_LOSS, f"{exc.message}. Please verify your warmup data is in TFRecord format."
        ) from None
    except ServingError as exc:
        status = exc.code
        raise
    finally:
        loop.close()
        metrics.MODEL_WARMUP_LATENCY.observe(path, status.name, value=(time.monotonic() - started) * 1e6)
        metrics.MODEL_WARMUP_RECORDS_READ.inc(path, status.name, amount=count)
    log.info(
        "Finished reading warmup data for model at %s. Number of warmup records read: %d. "
        "Elapsed time (microseconds): %d.",
        file,
        count,
        (time.monotonic() - started) * 1e6,
    )


def _records(file: str) -> Iterator[bytes]:
    """Raw TFRecord payloads; corruption raises DataLossError with TF's own "corrupted record at N"."""
    # tf.data would wrap that message in function-node noise; this iterator keeps it as TF Serving shows it.
    with deprecation.silence():
        yield from tf.compat.v1.io.tf_record_iterator(file)


def _run(
    record: prediction_log_pb2.PredictionLog, target: Target, dataplane: DataPlane, loop: asyncio.AbstractEventLoop
) -> None:
    """Replay one record on `target` itself (the model name and version in the request do not matter)."""
    kind = record.WhichOneof("log_type")
    if kind == "predict_log":
        request = record.predict_log.request
        inputs = tensors.to_ndarrays(request.inputs)
        loop.run_until_complete(
            dataplane.predict(target, request.model_spec.signature_name, inputs, list(request.output_filter))
        )
    elif kind == "classify_log":
        request = record.classify_log.request
        dataplane.classify(target, request.model_spec.signature_name, request.input)
    elif kind == "regress_log":
        request = record.regress_log.request
        dataplane.regress(target, request.model_spec.signature_name, request.input)
    elif kind == "multi_inference_log":
        request = record.multi_inference_log.request
        tasks = [(model_spec(task.model_spec), task.method_name) for task in request.tasks]
        dataplane.multi_inference(target, tasks, request.input)
    elif kind == "session_run_log":
        # TF Serving prints the oneof field number.
        number = record.DESCRIPTOR.fields_by_name[kind].number
        raise ServingError(Code.UNIMPLEMENTED, f"Unsupported log_type for warmup: {number}")
    # An empty record or a predict_streamed_log is skipped, as TF Serving does.
