"""What the lifecycle and the data plane need from a loaded model version.

A runtime (today only `runtimes.tf_saved_model`) turns a version folder into a
`Servable`; nothing outside the runtime knows how inference is executed.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"


class Servable(Protocol):
    """One loaded version of one model."""

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        """Signature key -> SignatureDef, as exported."""

    def run(
        self,
        signature: meta_graph_pb2.SignatureDef,
        inputs: dict[str, np.ndarray],
        output_aliases: list[str],
        timeout_ms: int,
    ) -> list[np.ndarray]:
        """Run `signature` on inputs keyed by alias; return outputs in `output_aliases` order.

        Inputs are not checked against the signature's declared shapes (TF Serving
        does not check them either); the runtime raises `ServingError` on failure.
        """

    def run_multi(
        self,
        tasks: list[tuple[meta_graph_pb2.SignatureDef, list[str]]],
        inputs: dict[str, np.ndarray],
        timeout_ms: int,
    ) -> list[list[np.ndarray]]:
        """Run several signatures on the same inputs in one execution (MultiInference).

        Each task is (signature, output aliases); `inputs` is fed to every signature's
        input of that alias. Returns each task's outputs in its alias order.
        """

    def close(self) -> None:
        """Release the version's memory; called once, after the last request."""
