"""MLServer custom runtime serving a SavedModel through TensorFlow (V2 inference protocol).

bench/compare.py writes settings.json and model-settings.json next to a copy of this file and
starts `mlserver start FOLDER` in MLServer's own virtualenv.
"""

import tensorflow as tf
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class SavedModelRuntime(MLModel):
    async def load(self) -> bool:
        self.signature = tf.saved_model.load(self.settings.parameters.uri).signatures["serving_default"]
        self.input = next(iter(self.signature.structured_input_signature[1]))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        outputs = self.signature(**{self.input: tf.constant(x)})
        y = next(iter(outputs.values())).numpy()
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("y", y)])
