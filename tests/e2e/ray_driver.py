"""A local Ray cluster with Serve's HTTP and gRPC proxies, driven over stdin by tests/e2e/test_ray_serve.py.

Usage: ray_driver.py TEMP_DIR HTTP_PORT GRPC_PORT NUM_CPUS. Prints "ready", then answers one line per
command: `deploy {json builder args}` (serve.run of pyserving.ray_serve:app as "pyserving", route "/"),
`replicas` (the number of RUNNING replicas), `quit` (shuts Serve and the cluster down, then exits).
"""

import json
import sys

import ray
from ray import serve

from pyserving import ray_serve


def running_replicas() -> int:
    application = serve.status().applications.get("pyserving")
    if application is None:
        return 0
    states = application.deployments["pyserving"].replica_states
    return int(states.get("RUNNING", 0))


def main() -> None:
    temp_dir, http_port, grpc_port, cpus = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ray.init(
        num_cpus=cpus,
        include_dashboard=False,
        _temp_dir=temp_dir,
        _node_ip_address="127.0.0.1",
        configure_logging=False,
    )
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": ray_serve.GRPC_SERVICER_FUNCTIONS},
    )
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, payload = line.strip().partition(" ")
        if command == "deploy":
            serve.run(ray_serve.app(json.loads(payload)), name="pyserving", route_prefix="/")
            print("deployed", flush=True)
        elif command == "replicas":
            print(running_replicas(), flush=True)
        else:
            break
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
