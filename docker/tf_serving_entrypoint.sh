#!/bin/bash
# TF Serving's image entrypoint, with one difference: `exec`, so that the server is PID 1 and
# receives SIGTERM from `docker stop` / Kubernetes (TF Serving's script leaves bash as PID 1).
# Arguments given to `docker run IMAGE ...` are appended; a repeated flag's last value wins.
set -e
exec tensorflow_model_server --port=8500 --rest_api_port=8501 \
  --model_name="${MODEL_NAME}" --model_base_path="${MODEL_BASE_PATH}/${MODEL_NAME}" "$@"
