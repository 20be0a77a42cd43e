"""The listeners: an HTTP server that routes paths to mounted ASGI apps, and a gRPC server of services."""
