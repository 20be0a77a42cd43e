"""SavedModels the tests export themselves with TensorFlow (multi-input, dtypes, formatting)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import tensorflow as tf  # noqa: E402


class _Kitchen(tf.Module):
    """Signatures covering several inputs/outputs and every JSON-encodable dtype."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="a"),
                                  tf.TensorSpec([None], tf.float32, name="b")])
    def two(self, a, b):
        return {"sum": a + b, "product": a * b}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text"),
                                  tf.TensorSpec([None], tf.int64, name="count"),
                                  tf.TensorSpec([None], tf.bool, name="flag")])
    def types(self, text, count, flag):
        return {"text_bytes": text, "text": text, "count": count * 2, "flag": tf.logical_not(flag),
                "length": tf.strings.length(text)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def floats(self, x):
        return {"third": x / 3.0, "scaled": x * 9e6, "tiny": x * 1e-5}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float64, name="x")])
    def doubles(self, x):
        return {"third": x / 3.0}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.int32, name="x")])
    def ints(self, x):
        return {"y": x + 1}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="x")])
    def half(self, x):
        return {"y": tf.cast(x, tf.float16)}


    @tf.function(input_signature=[tf.TensorSpec([], tf.int64, name="n")])
    def slow(self, n):
        """Counts to n in a graph loop: seconds of CPU for n in the millions."""
        return {"count": tf.while_loop(lambda i: i < n, lambda i: i + 1, [tf.constant(0, tf.int64)])[0]}


def export_kitchen(base: Path) -> Path:
    module = _Kitchen()
    names = ("two", "types", "floats", "doubles", "ints", "half", "slow")
    signatures = {name: getattr(module, name) for name in names}
    signatures["serving_default"] = module.two
    tf.saved_model.save(module, str(base / "1"), signatures=signatures)
    return base
