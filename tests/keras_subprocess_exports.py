"""Keras exports that need their own process (see `models.export_keras_variants`): `python THIS_FILE BASE`.

Two logical CPUs must be configured before TensorFlow initialises, and `TF_USE_LEGACY_KERAS=1` (set by
the caller) must be in the environment before TensorFlow is imported, as a tf-keras user has it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import keras  # Keras 3 whatever TF_USE_LEGACY_KERAS says
import tensorflow as tf
import tf_keras
from models import KERAS_WEIGHTS


def main(base: Path) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
        mirrored.set_weights(KERAS_WEIGHTS)
    tf.saved_model.save(mirrored, str(base / "keras_mirrored" / "1"))

    assert tf.keras is tf_keras or tf.keras.__name__.startswith("tf_keras"), "TF_USE_LEGACY_KERAS=1 is not set"
    legacy = tf_keras.Sequential([tf_keras.layers.Dense(1, input_shape=(2,))])
    legacy.set_weights(KERAS_WEIGHTS)
    tf.saved_model.save(legacy, str(base / "legacy_keras" / "1"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
