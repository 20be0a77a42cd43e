"""The Open Inference Protocol (KServe V2), beside TF Serving's API, over the same data plane.

`rest.V2RestApi` is mounted at `/v2` on the REST port; `grpc_api.services` adds
`inference.GRPCInferenceService` to the gRPC server. Both are thin adapters over
`inference` (the protocol's requests against `serving.DataPlane`) and `datatypes`
(V2 tensors <-> numpy). Which signature runs is the request parameter
`signature_name` (default `serving_default`).
"""
