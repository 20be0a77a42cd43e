"""Export the bundled example model: half_plus_two (y = 0.5 * x + 2) as a TF2 SavedModel.

`python -m pyserving.tools.example BASE_PATH` writes BASE_PATH/1/ unless a version exists already.
"""

from __future__ import annotations

import os
import sys


def export_half_plus_two(base_path: str, version: int = 1) -> str:
    """Write half_plus_two to `base_path/<version>` and return that folder."""
    import tensorflow as tf

    class HalfPlusTwo(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = tf.Variable(0.5)
            self.b = tf.Variable(2.0)

        @tf.function(input_signature=[tf.TensorSpec([None, 1], tf.float32, name="x")])
        def predict(self, x: tf.Tensor) -> dict[str, tf.Tensor]:
            return {"y": self.a * x + self.b}

    module = HalfPlusTwo()
    export_dir = os.path.join(base_path, str(version))
    tf.saved_model.save(module, export_dir, signatures={"serving_default": module.predict})
    return export_dir


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m pyserving.tools.example BASE_PATH", file=sys.stderr)
        return 2
    base_path = os.path.abspath(argv[0])
    if os.path.isdir(base_path) and any(name.isdigit() for name in os.listdir(base_path)):
        print(f"Example model already exported under {base_path}")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    print(f"Exported example model to {export_half_plus_two(base_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
