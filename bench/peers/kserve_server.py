"""KServe's Python server serving a SavedModel through TensorFlow, as KServe's docs show a custom model.

Started by bench/compare.py in KServe's own virtualenv: python kserve_server.py NAME SAVED_MODEL_DIR PORT
"""

import sys

import kserve
import numpy as np
import tensorflow as tf
import uvicorn

# KServe binds 0.0.0.0 and has no host option; a benchmark must stay on loopback.
_config_init = uvicorn.Config.__init__


def _loopback_config(self, *args, **kwargs):
    kwargs["host"] = "127.0.0.1"
    _config_init(self, *args, **kwargs)


uvicorn.Config.__init__ = _loopback_config


class SavedModel(kserve.Model):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.signature = tf.saved_model.load(path).signatures["serving_default"]
        self.input = next(iter(self.signature.structured_input_signature[1]))
        self.ready = True

    def predict(self, payload, headers=None):
        x = tf.constant(np.asarray(payload["instances"], dtype=np.float32))
        outputs = self.signature(**{self.input: x})
        return {"predictions": next(iter(outputs.values())).numpy().tolist()}


if __name__ == "__main__":
    name, path, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([SavedModel(name, path)])
