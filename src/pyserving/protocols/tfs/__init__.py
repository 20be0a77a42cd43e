"""TensorFlow Serving's API: REST (`/v1`), gRPC PredictionService and ModelService, and warmup files."""
