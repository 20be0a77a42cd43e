"""What the lifecycle and the data plane need from a loaded model version.

A runtime (see `registry`) turns a version folder into a `Servable`; nothing
outside the runtime knows how inference is executed. Signatures are described
by TensorFlow's `SignatureDef` whatever the runtime, because that is what TF
Serving's metadata APIs return.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from tensorflow.core.protobuf import meta_graph_pb2

__all__ = ["CLASSIFY_METHOD", "DEFAULT_SIGNATURE", "PREDICT_METHOD", "REGRESS_METHOD", "Servable"]

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"


class Servable(Protocol):
    """One loaded version of one model."""

    @property
    def runtime(self) -> str:
        """The runtime's name in `runtime_latency` metrics (TF Serving says "TF1" for a Session)."""
        ...

    @property
    def signature_defs(self) -> dict[str, meta_graph_pb2.SignatureDef]:
        """Signature key -> SignatureDef, as exported."""
        ...

    def run(
        self, signature_name: str, inputs: dict[str, np.ndarray], output_aliases: Sequence[str], timeout_ms: int
    ) -> list[np.ndarray]:
        """Run a signature on inputs keyed by alias; return outputs in `output_aliases` order.

        The caller has checked that the signature exists and that the aliases are
        its own. Inputs are not checked against the declared shapes (TF Serving
        does not check them either); the runtime raises `ServingError` on failure.
        """
        ...

    def run_multi(
        self, tasks: Sequence[tuple[str, Sequence[str]]], inputs: dict[str, np.ndarray], timeout_ms: int
    ) -> list[list[np.ndarray]]:
        """Run several signatures on the same inputs in one execution (MultiInference).

        Each task is (signature name, output aliases); `inputs` is fed to every
        signature's input of that alias. Returns each task's outputs in its alias order.
        """
        ...

    def close(self) -> None:
        """Release the version's memory; called once, after the last request."""
        ...
