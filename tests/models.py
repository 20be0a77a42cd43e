"""SavedModels the tests export themselves with TensorFlow (multi-input, dtypes, formatting)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2


class _Kitchen(tf.Module):
    """Signatures covering several inputs/outputs and every JSON-encodable dtype."""

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.float32, name="a"), tf.TensorSpec([None], tf.float32, name="b")]
    )
    def two(self, a, b):
        return {"sum": a + b, "product": a * b}

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="text"),
            tf.TensorSpec([None], tf.int64, name="count"),
            tf.TensorSpec([None], tf.bool, name="flag"),
        ]
    )
    def types(self, text, count, flag):
        return {
            "text_bytes": text,
            "text": text,
            "count": count * 2,
            "flag": tf.logical_not(flag),
            "length": tf.strings.length(text),
        }

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


COLORS = ("red", "green", "blue")


def color_image(color: str, size: int = 16) -> bytes:
    """A JPEG whose pixels are mostly `color`, with noise."""
    rng = np.random.default_rng(COLORS.index(color))
    pixels = rng.uniform(0, 60, (size, size, 3))
    pixels[..., COLORS.index(color)] += 180
    return tf.io.encode_jpeg(tf.constant(pixels, tf.uint8)).numpy()


def export_color_classifier(base: Path) -> Path:
    """A Keras classifier served the way TF Serving users need it: serialized tf.Example in (a JPEG
    under feature `image`, decoded in the graph), `classes` (strings) and `scores` out."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    images = rng.uniform(0, 0.3, (600, 8, 8, 3)).astype(np.float32)
    images[np.arange(600), :, :, labels] += 0.7
    model = tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 3)),
            tf.keras.layers.GlobalAveragePooling2D(),
            tf.keras.layers.Dense(3, activation="softmax"),
        ]
    )
    model.compile(tf.keras.optimizers.Adam(0.1), "sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=40, verbose=0)
    names = tf.constant(COLORS)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="inputs")])
    def classify(serialized):
        jpegs = tf.io.parse_example(serialized, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]
        pixels = tf.map_fn(
            lambda jpeg: tf.image.resize(tf.image.decode_jpeg(jpeg, channels=3), [8, 8]) / 255.0,
            jpegs,
            fn_output_signature=tf.float32,
        )
        scores = model(pixels)
        return {"classes": tf.tile(names[None], [tf.shape(scores)[0], 1]), "scores": scores}

    # Keras 3's ExportArchive, not tf.saved_model.save on a wrapper: only the archive writes a graph
    # whose signature reads the same variables its restore op fills (see docs/ARCHITECTURE.md).
    archive = tf.keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", classify)
    archive.write_out(str(base / "1"), verbose=False)
    return base


# Every Keras export below is y = 2a + 3b + 1 for inputs [a, b]: a known answer whatever the export path.
KERAS_WEIGHTS = [np.array([[2.0], [3.0]], np.float32), np.array([1.0], np.float32)]


def export_wrapped_keras(base: Path) -> Path:
    """The Keras 3 export TF1's loader cannot restore: a Keras model inside a tf.Module, saved with tf.saved_model.save.

    The graph's restore op fills other variable handles than those the signature reads."""
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.set_weights(KERAS_WEIGHTS)
    module = tf.Module()
    module.model = model
    module.serve = tf.function(lambda x: {"y": model(x)}, input_signature=[tf.TensorSpec([None, 2], tf.float32)])
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": module.serve})
    return base


def export_identity_read_keras(base: Path) -> Path:
    """`export_wrapped_keras` edited so that the Session path's fixed restore cannot key its variables, while
    `tf.saved_model.load` (which reads only the object graph and functions, not the main graph) still serves it.

    No public API export tried on TF 2.21 reproduces an unkeyed variable (a tf.Module's ShardedVariable
    under a partitioned ParameterServerStrategy loads through the restore op itself; Keras 3 models with
    BatchNormalization, Normalization, Embedding, LSTM, StringLookup or a shared layer through the fixed
    restore; Keras 3 under that strategy does not save), so the main graph is edited: the signature's call
    reads each variable handle through an Identity, which hides which object graph node the handle stands for."""
    export_wrapped_keras(base)
    file = base / "1" / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    ops = {node.name: node.op for node in graph.node}
    call = next(node for node in graph.node if node.name == "StatefulPartitionedCall")
    for i, name in enumerate(call.input):
        if ops.get(name) == "VarHandleOp":
            identity = graph.node.add(name=f"{name}/read_through", op="Identity", input=[name])
            identity.attr["T"].type = tf.resource.as_datatype_enum
            call.input[i] = identity.name
    file.write_bytes(saved_model.SerializeToString())
    return base


def export_keras_variants(base: Path) -> dict[str, Path]:
    """The same Keras Sequential model exported four ways, each a base path with version 1:

    `keras_export` (Keras 3 `model.export()`), `keras_saved_model` (Keras 3, `tf.saved_model.save`),
    and, from a subprocess that needs its own TensorFlow set-up, `keras_mirrored` (Keras 3 under a
    two-CPU `MirroredStrategy`, `tf.saved_model.save`) and `legacy_keras` (tf-keras with
    `TF_USE_LEGACY_KERAS=1`, `tf.saved_model.save`)."""
    model = tf.keras.Sequential([tf.keras.Input((2,)), tf.keras.layers.Dense(1)])
    model.set_weights(KERAS_WEIGHTS)
    model.export(str(base / "keras_export" / "1"), verbose=False)
    tf.saved_model.save(model, str(base / "keras_saved_model" / "1"))
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="3")
    script = Path(__file__).with_name("keras_subprocess_exports.py")
    subprocess.run([sys.executable, str(script), str(base)], env=env, check=True, timeout=300)
    return {name: base / name for name in ("keras_export", "keras_saved_model", "keras_mirrored", "legacy_keras")}


def export_text_tokenizer(base: Path) -> Path:
    """A TF Text model: strings in, `count` (whitespace tokens per string) and `tokens` (padded with "") out."""
    import tensorflow_text

    tokenizer = tensorflow_text.WhitespaceTokenizer()

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def tokenize(text):
        tokens = tokenizer.tokenize(text)
        return {"count": tokens.row_lengths(), "tokens": tokens.to_tensor(default_value="")}

    module = tf.Module()
    module.tokenize = tokenize
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": tokenize})
    return base


def export_increment(base: Path, version: int = 1, op: str = "AddV2") -> Path:
    """x [n] float -> y = x + 1. With another `op`, the addition's op is renamed to it in the saved graph:
    a model that needs an op no library registers."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def increment(x):
        return {"y": x + 1.0}

    module = tf.Module()
    module.increment = increment
    tf.saved_model.save(module, str(base / str(version)), signatures={"serving_default": increment})
    file = base / str(version) / "saved_model.pb"
    saved_model = saved_model_pb2.SavedModel.FromString(file.read_bytes())
    for function in saved_model.meta_graphs[0].graph_def.library.function:
        for node in function.node_def:
            if node.op == "AddV2":
                node.op = op
    file.write_bytes(saved_model.SerializeToString())
    return base


def export_busy_doubler(base: Path, iterations: int) -> Path:
    """x [batch] float -> 2x, after `iterations` steps of busy work per call (not per row): a batchable slow model."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def double(x):
        spin = tf.while_loop(lambda i: i < iterations, lambda i: i + 1, [tf.constant(0, tf.int64)])[0]
        return {"y": x * 2.0 + tf.cast(spin - iterations, tf.float32)}

    module = tf.Module()
    module.double = double
    tf.saved_model.save(module, str(base / "1"), signatures={"serving_default": double})
    return base


# The Open Inference Protocol's datatypes and the TF dtypes of `export_v2_types`' signatures (one per datatype,
# named as the datatype in lower case).
V2_DATATYPES = {
    "BOOL": tf.bool,
    "INT8": tf.int8,
    "INT16": tf.int16,
    "INT32": tf.int32,
    "INT64": tf.int64,
    "UINT8": tf.uint8,
    "UINT16": tf.uint16,
    "UINT32": tf.uint32,
    "UINT64": tf.uint64,
    "FP16": tf.float16,
    "BF16": tf.bfloat16,
    "FP32": tf.float32,
    "FP64": tf.float64,
    "BYTES": tf.string,
}


def _v2_step(dtype: tf.DType):
    """x [batch, 2] -> y: not x (bool), x + "!" (strings), x + 1 (numbers): an answer only the graph gives."""

    @tf.function(input_signature=[tf.TensorSpec([None, 2], dtype, name="x")])
    def step(x):
        if dtype == tf.bool:
            return {"y": tf.logical_not(x)}
        if dtype == tf.string:
            return {"y": tf.strings.join([x, "!"])}
        return {"y": x + tf.constant(1, dtype)}

    return step


def export_v2_types(base: Path, version: int) -> Path:
    """base/<version>: serving_default a, b float32 [batch] -> sum (a + b), diff (a - b), scaled (a * version),
    and a signature per V2 datatype (see `V2_DATATYPES` and `_v2_step`)."""

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.float32, name="a"), tf.TensorSpec([None], tf.float32, name="b")]
    )
    def arithmetic(a, b):
        return {"sum": a + b, "diff": a - b, "scaled": a * float(version)}

    module = tf.Module()
    signatures = {"serving_default": arithmetic}
    for datatype, dtype in V2_DATATYPES.items():
        signatures[datatype.lower()] = _v2_step(dtype)
    for name, function in signatures.items():
        setattr(module, f"f_{name}", function)
    tf.saved_model.save(module, str(base / str(version)), signatures=signatures)
    return base
