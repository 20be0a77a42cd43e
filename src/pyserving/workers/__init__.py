"""`--num_workers` > 1: protocol workers on shared ports, one model process, a supervisor (docs/WORKERS.md).

`supervisor` is the process the user started (it imports no TensorFlow); `model_process` owns the models,
lifecycle and batchers; `worker` runs the protocol adapters over a remote data plane; `wire` is the
channel between them. `python -m pyserving.workers model|worker N` is how the supervisor starts them.
"""

__all__: list[str] = []
