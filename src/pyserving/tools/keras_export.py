"""Export a Keras classifier with a classify signature that TF Serving's (and pyserving's) `:classify` accepts.

TF Serving's Classify API wants a signature with one input `inputs` (serialized
`tf.Example`s) and outputs `classes` (strings) and `scores`; Keras exports
nothing like it. `export_classifier` wraps the model in such a signature,
parsing either a float feature or an encoded image (decoded and resized in the
graph) from each example, and writes the next version folder of a model base
path:

    from pyserving.keras_export import export_classifier
    export_classifier(model, ["cat", "dog"], "/models/pets", image_feature="image")
    # curl -d '{"examples": [{"image": {"b64": "<base64 JPEG>"}}]}' \\
    #      localhost:8501/v1/models/pets:classify
    # {"results": [[["cat", 0.92], ["dog", 0.08]]]}

The graph is written with `keras.export.ExportArchive`, whose restore op fills
the variables the signature reads (a Keras 3 model saved with
`tf.saved_model.save` inside another object does not, and cannot be served).
The signature's method_name is set to `tensorflow/serving/classify`, so it also
passes `--enable_signature_method_name_check`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence

import tensorflow as tf

from pyserving.runtimes.servable import CLASSIFY_METHOD, DEFAULT_SIGNATURE
from pyserving.tools.convert import next_version, publish, set_method_names

__all__ = ["export_classifier"]


def export_classifier(
    model: tf.keras.Model,
    class_names: Sequence[str],
    export_base: str,
    *,
    feature: str = "x",
    image_feature: str | None = None,
    signature_name: str = DEFAULT_SIGNATURE,
    version: int | None = None,
) -> str:
    """Write `model` as `<export_base>/<version>` with a classify signature; return that folder.

    The model takes one input and returns one score per class ([batch, len(class_names)]).
    Without `image_feature`, each example carries the model input flattened as the float
    feature `feature`. With it, each example carries an encoded image (JPEG, PNG, GIF, BMP)
    under `image_feature`; it is decoded, resized to the model's input height and width
    and scaled to [0, 1].
    """
    input_shape = tuple(model.inputs[0].shape[1:])
    if None in input_shape:
        raise ValueError(f"the model input needs a fixed shape, got {input_shape}")
    names = tf.constant(list(class_names))

    def to_inputs(serialized: tf.Tensor) -> tf.Tensor:
        if image_feature is None:
            spec = {feature: tf.io.FixedLenFeature(input_shape, tf.float32)}
            return tf.io.parse_example(serialized, spec)[feature]
        encoded = tf.io.parse_example(serialized, {image_feature: tf.io.FixedLenFeature([], tf.string)})
        height, width, channels = input_shape

        def decode(image: tf.Tensor) -> tf.Tensor:
            pixels = tf.io.decode_image(image, channels=channels, expand_animations=False)
            return tf.image.resize(pixels, [height, width]) / 255.0

        return tf.map_fn(decode, encoded[image_feature], fn_output_signature=tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
        scores = tf.cast(model(to_inputs(serialized)), tf.float32)
        tf.debugging.assert_equal(
            tf.shape(scores)[1],
            len(class_names),
            message="the model returns a different number of scores than class names",
        )
        return {"classes": tf.tile(names[None], [tf.shape(scores)[0], 1]), "scores": scores}

    version = next_version(export_base) if version is None else version
    target = os.path.join(export_base, str(version))
    if os.path.exists(target):
        raise FileExistsError(target)
    staging = os.path.join(export_base, f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(signature_name, classify)
    archive.write_out(staging, verbose=False)
    set_method_names(staging, {signature_name: CLASSIFY_METHOD})
    publish(staging, target)
    return target
