"""`pyserving example`: the getting-started model, half_plus_two (y = 0.5 * x + 2), as a TF2 SavedModel.

Its signatures are those TF Serving's own half_plus_two example documents:
`serving_default` (x, float [batch, 1] -> y) for `:predict`, and `regress_x_to_y` /
`classify_x_to_y`, which take serialized tf.Examples with a float feature `x`, for
`:regress` and `:classify`.
"""

from __future__ import annotations

import os
import shutil

from pyserving.runtimes.servable import CLASSIFY_METHOD, REGRESS_METHOD
from pyserving.tools.convert import publish, set_method_names

__all__ = ["export_half_plus_two"]


def export_half_plus_two(base_path: str, version: int = 1) -> str:
    """Write half_plus_two to `base_path/<version>` (staged, then renamed into place); return that folder."""
    import tensorflow as tf

    target = os.path.join(base_path, str(version))
    if os.path.exists(target):
        raise FileExistsError(f"{target} already exists")

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(0.5)
            self.b = tf.Variable(2.0)

        def _y(self, x: tf.Tensor) -> tf.Tensor:
            return self.a * x + self.b

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": self._y(x)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def regress(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"outputs": self._y(_feature_x(serialized))}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
        def classify(self, serialized: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"scores": self._y(_feature_x(serialized))}

    def _feature_x(serialized: tf.Tensor) -> tf.Tensor:
        return tf.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})["x"]

    module = HalfPlusTwo()
    staging = os.path.join(base_path, f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    signatures = {
        "serving_default": module.predict,
        "regress_x_to_y": module.regress,
        "classify_x_to_y": module.classify,
    }
    tf.saved_model.save(module, staging, signatures=signatures)
    set_method_names(staging, {"regress_x_to_y": REGRESS_METHOD, "classify_x_to_y": CLASSIFY_METHOD})
    publish(staging, target)
    return target
