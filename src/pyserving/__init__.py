"""pyserving: a pip-installable drop-in replacement for TensorFlow Serving."""

__version__ = "0.1.0"
