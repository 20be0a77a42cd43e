"""TF Serving's REST JSON: parsing and errors as rapidjson, predict tensors both ways, tf.Example bodies."""
