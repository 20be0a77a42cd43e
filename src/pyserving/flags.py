"""`tensorflow_model_server` command-line flags, parsed with TF Serving's rules.

Rules (TF's `tensorflow::Flags`): only `--name=value`; booleans also as bare
`--name`, values true/false (any case) or 1/0; integers must parse completely; the last
repeat wins. A bad value or `--help` prints the usage on stdout and exits 255;
unknown arguments print `unknown argument: ...` with the usage and start anyway.
The field list of `Options` is the single source of the flags, their defaults
and help texts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from pyserving.errors import Code, PyservingError, ServingError

__all__ = ["Options", "ParseResult", "UsageError", "parse", "usage"]

INT32 = "int32"
INT64 = "int64"
_CPUS = os.cpu_count() or 1


def _memory_bytes() -> int:
    """The memory this process may use: the cgroup's limit when there is one, else the machine's RAM (0: unknown)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as file:
                text = file.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


# --max_decoded_tensor_bytes: 2 GiB, or a quarter of the memory if that is less.
_MAX_DECODED_BYTES = min(2**31, _memory_bytes() // 4 or 2**31)


def _flag(default: Any, kind: str, help: str, *, pending: str = "") -> Any:
    """A flag field. `pending` says why a flag that is accepted has no effect, in the README's words:
    "planned: ..." (a later release implements it), "not supported" or "not applicable: ..." (why)."""
    return field(default=default, metadata={"kind": kind, "help": help, "pending": pending})


def _entries(flag: str) -> list[str]:
    """A comma-separated flag's non-empty entries."""
    return [entry for entry in flag.split(",") if entry]


@dataclass
class Options:
    # Ports and transport
    port: int = _flag(8500, INT32, "Port to listen on for gRPC API (0 = no TCP gRPC listener)")
    grpc_socket_path: str = _flag("", "string", "If non-empty, also listen for gRPC on this UNIX socket path")
    rest_api_port: int = _flag(
        0, INT32, "Port to listen on for HTTP/REST API; 0 disables REST. Must differ from --port"
    )
    rest_api_num_threads: int = _flag(4 * _CPUS, INT32, "Number of threads for HTTP/REST API processing")
    rest_api_timeout_in_ms: int = _flag(30000, INT32, "Timeout for HTTP/REST API inference calls (ms)")
    rest_api_enable_cors_support: bool = _flag(False, "bool", "Enable CORS headers in REST API responses")
    grpc_channel_arguments: str = _flag("", "string", "Comma separated list of gRPC channel arguments key=value")
    grpc_max_threads: int = _flag(4 * _CPUS, INT32, "Max gRPC server threads to handle calls")
    enable_grpc_healthcheck_service: bool = _flag(False, "bool", "Enable the standard gRPC health checking service")
    # Model selection and runtime
    model_name: str = _flag("default", "string", "Name of model (ignored if --model_config_file is set)")
    model_base_path: str = _flag("", "string", "Path to export (ignored if --model_config_file is set)")
    model_platform: str = _flag(
        "",
        "string",
        "pyserving: runtime of the --model_name model, tensorflow, onnx or python (ignored if --model_config_file "
        "is set). Empty: detected from the newest version folder at start-up (model.onnx and no saved_model.pb: "
        "onnx; only processing.py: python; else tensorflow)",
    )
    saved_model_tags: str = _flag("serve", "string", "Comma-separated set of tags of the MetaGraphDef to load")
    prefer_tflite_model: bool = _flag(
        False,
        "bool",
        "EXPERIMENTAL: serve a version folder's model.tflite instead of its SavedModel (pyserving[tflite])",
    )
    num_tflite_pools: int = _flag(_CPUS, INT32, "EXPERIMENTAL: TFLite interpreters per model version (min 1)")
    num_tflite_interpreters_per_pool: int = _flag(
        1, INT32, "EXPERIMENTAL: > 1 runs a large request in mini-batches of ceil(500 / N) rows on several interpreters"
    )
    enable_signature_method_name_check: bool = _flag(
        False, "bool", "Require predict/classify/regress APIs to match the signature's method_name"
    )
    # Config files and polling
    model_config_file: str = _flag(
        "", "string", "Text-format ModelServerConfig; overrides --model_name/--model_base_path"
    )
    model_config_file_poll_wait_seconds: int = _flag(0, INT32, "Re-read --model_config_file every N seconds (0 = once)")
    file_system_poll_wait_seconds: int = _flag(1, INT32, "Seconds between polls of the base path for new versions")
    model_cache_dir: str = _flag(
        "",
        "string",
        "pyserving: folder where versions of s3://, gs:// and az:// base paths are copied before they load "
        "(empty: pyserving-model-cache in the system's temporary folder)",
    )
    platform_config_file: str = _flag("", "string", "Text-format PlatformConfigMap", pending="not supported")
    allow_version_labels_for_unavailable_models: bool = _flag(
        False, "bool", "Allow assigning a new label to a version that is not yet available"
    )
    tensorflow_session_config_file: str = _flag(
        "", "string", "Text-format TF ConfigProto for sessions", pending="not supported"
    )
    thread_pool_factory_config_file: str = _flag(
        "", "string", "Text-format ThreadPoolFactoryConfig", pending="not supported"
    )
    # Loading and unloading
    num_load_threads: int = _flag(0, INT32, "Threads for loading versions after the initial load (0 = serial)")
    num_unload_threads: int = _flag(0, INT32, "Threads for unloading versions (0 = serial)")
    max_num_load_retries: int = _flag(5, INT32, "Retries after a failed load (0 = one attempt)")
    load_retry_interval_micros: int = _flag(60_000_000, INT64, "Wait between load retries in microseconds")
    flush_filesystem_caches: bool = _flag(
        True, "bool", "Flush filesystem caches after loads", pending="not applicable: no TF file-system cache to flush"
    )
    remove_unused_fields_from_bundle_metagraph: bool = _flag(
        True,
        "bool",
        "Strip unneeded MetaGraphDef fields after load",
        pending="not applicable: pyserving keeps only the signatures",
    )
    # Batching
    enable_batching: bool = _flag(False, "bool", "Batch concurrent requests")
    batching_parameters_file: str = _flag("", "string", "Text-format BatchingParameters")
    enable_per_model_batching_parameters: bool = _flag(
        False, "bool", "Read batching_params.pbtxt from each version folder"
    )
    # Monitoring and profiling
    monitoring_config_file: str = _flag("", "string", "Text-format MonitoringConfig")
    metrics_path: str = _flag(
        "",
        "string",
        "pyserving: also serve the Prometheus metrics on the REST port at this path, e.g. /metrics, with or "
        "without --monitoring_config_file (empty: off; not under /v1 or /v2)",
    )
    enable_profiler: bool = _flag(True, "bool", "Enable the TensorFlow profiler service")
    # Security
    ssl_config_file: str = _flag("", "string", "Text-format SSLConfig for gRPC TLS")
    use_alts_credentials: bool = _flag(False, "bool", "Use Google ALTS credentials", pending="not supported")
    # Threading, performance, hardware
    tensorflow_session_parallelism: int = _flag(0, INT64, "Threads for TF sessions (0 = auto); sets intra and inter")
    tensorflow_intra_op_parallelism: int = _flag(0, INT64, "TF intra-op threads (0 = auto)")
    tensorflow_inter_op_parallelism: int = _flag(
        0, INT64, "TF inter-op threads (0 = auto: pyserving runs graphs without loops on the calling thread)"
    )
    per_process_gpu_memory_fraction: float = _flag(0.0, "float", "GPU memory fraction", pending="not supported")
    xla_cpu_compilation_enabled: bool = _flag(False, "bool", "EXPERIMENTAL: XLA:CPU JIT", pending="not supported")
    xla_gpu_compilation_enabled: bool = _flag(False, "bool", "EXPERIMENTAL: XLA:GPU JIT", pending="not supported")
    mixed_precision: str = _flag("", "string", "Automatic mixed precision, e.g. bfloat16", pending="not supported")
    enable_serialization_as_tensor_content: bool = _flag(
        False, "bool", "gRPC Predict responses use tensor_content instead of *_val fields"
    )
    skip_initialize_tpu: bool = _flag(
        False, "bool", "Whether to skip auto initializing TPU", pending="not applicable: TPU builds only"
    )
    # Warmup and misc
    enable_model_warmup: bool = _flag(True, "bool", "Replay assets.extra/tf_serving_warmup_requests at load")
    num_request_iterations_for_warmup: int = _flag(0, INT32, "Replays per warmup record (0 = 1)")
    version: bool = _flag(False, "bool", "Display version and exit")
    # pyserving extensions
    host: str = _flag("0.0.0.0", "string", "pyserving: address the gRPC and REST listeners bind to")
    shutdown_grace_period_seconds: int = _flag(
        20, INT32, "pyserving: on SIGTERM/SIGINT, how long in-flight requests may take before the server exits"
    )
    rest_api_max_body_bytes: int = _flag(
        64 * 1024 * 1024, INT64, "pyserving: largest REST request body accepted (413 beyond it)"
    )
    max_decoded_tensor_bytes: int = _flag(
        _MAX_DECODED_BYTES,
        INT64,
        "pyserving: most bytes a request's input tensors may take once decoded, checked before they are built "
        "(INVALID_ARGUMENT / 400 beyond it; 0 = no limit). Default: 2 GiB, or a quarter of the memory if less",
    )
    rest_api_codec_process_min_bytes: int = _flag(
        1024 * 1024,
        INT64,
        "pyserving: REST bodies (predict, classify, regress, V2 infer) and predict and infer answers of at least "
        "this many bytes are parsed (written) in a codec process, so that they do not stall this process's other "
        "clients (0 = never)",
    )
    rest_api_codec_processes: int = _flag(
        1, INT32, "pyserving: most codec processes per serving process (each started at the first big body)"
    )
    rest_api_read_timeout_seconds: int = _flag(
        30, INT32, "pyserving: time a REST client has to send a whole request before it is disconnected"
    )
    rest_api_enable_ssl: bool = _flag(
        False, "bool", "pyserving: serve REST over TLS with the --ssl_config_file certificates"
    )
    rest_api_max_header_bytes: int = _flag(
        64 * 1024, INT64, "pyserving: largest REST request head (request line and headers) accepted (431 beyond it)"
    )
    rest_api_max_header_count: int = _flag(
        100, INT32, "pyserving: most headers a REST request may have (431 beyond it)"
    )
    custom_op_libraries: str = _flag(
        "",
        "string",
        "pyserving: comma-separated op libraries (.so) to load with tf.load_op_library at start-up, for models "
        "with custom ops (TF Text's ops need none: tensorflow_text is imported when a model needs it)",
    )
    custom_op_modules: str = _flag(
        "", "string", "pyserving: comma-separated Python modules to import at start-up, whose import registers ops"
    )
    shutdown_delay_seconds: int = _flag(
        5,
        INT32,
        "pyserving: on SIGTERM/SIGINT, how long the server keeps accepting requests (with /readyz and gRPC health "
        "already NOT_SERVING, and REST responses closing their connections) before the listeners close, so that "
        "load balancers stop routing here first (Kubernetes endpoint propagation takes a few seconds)",
    )

    num_workers: str = _flag(
        "1",
        "string",
        "pyserving: processes doing the protocol work (HTTP, JSON, protobuf) on the shared ports; 1 is one "
        "process for everything; N > 1 adds one model process that owns the models and batchers; auto: one "
        "worker per CPU",
    )

    enable_python_processing: bool = _flag(
        False,
        "bool",
        "pyserving: import a version folder's processing.py, whose functions add signatures (pre- and "
        "post-processing), and serve pure-Python versions (model_platform python). Code in a model folder runs "
        "with the server's rights. Off: processing.py is never imported (a warning names it)",
    )
    python_processing_threads: int = _flag(
        4 * _CPUS, INT32, "pyserving: threads running per-request Python processing functions (min 1)"
    )
    python_processing_timeout_in_ms: int = _flag(
        60000,
        INT32,
        "pyserving: bound on a Python processing call whose request carries no deadline (a gRPC call "
        "without one; REST calls use --rest_api_timeout_in_ms)",
    )

    enable_tracing: bool = _flag(
        False,
        "bool",
        "pyserving: export an OpenTelemetry span per inference request over OTLP (pyserving[tracing]); the "
        "standard OTEL_* variables set the endpoint, service name (default pyserving), sampler and exporter",
    )

    def saved_model_tag_list(self) -> list[str]:
        return _entries(self.saved_model_tags)

    def custom_op_library_list(self) -> list[str]:
        return _entries(self.custom_op_libraries)

    def custom_op_module_list(self) -> list[str]:
        return _entries(self.custom_op_modules)

    def parallelism(self) -> tuple[int, int]:
        """(intra, inter) op threads with TF Serving's precedence rules."""
        intra = self.tensorflow_intra_op_parallelism or self.tensorflow_session_parallelism
        inter = self.tensorflow_inter_op_parallelism or self.tensorflow_session_parallelism
        return intra, inter

    def worker_count(self) -> int:
        """`--num_workers` as a number (auto: the CPUs); `ServingError` for anything but a positive integer or auto."""
        text = self.num_workers.strip()
        if text == "auto":
            return _CPUS
        if text.isdigit() and text.isascii() and 1 <= int(text) <= 1024:
            return int(text)
        raise ServingError(
            Code.INVALID_ARGUMENT, f"--num_workers={self.num_workers} must be auto or a whole number from 1 to 1024"
        )

    def validate(self) -> None:
        """TF Serving's start-up checks on flag combinations; `ServingError` (start-up fails) otherwise."""
        if not self.model_base_path and not self.model_config_file:
            raise ServingError(
                Code.INVALID_ARGUMENT,
                "Both server_options.model_base_path and server_options.model_config_file are empty!",
            )
        if self.port == 0 and not self.grpc_socket_path:
            raise ServingError(Code.INVALID_ARGUMENT, "server_options.grpc_port is not set.")
        if self.use_alts_credentials and self.ssl_config_file:
            raise ServingError(
                Code.INVALID_ARGUMENT, "Either use_alts_credentials must be false or ssl_config_file must be empty."
            )
        if self.batching_parameters_file and not self.enable_batching:
            raise ServingError(
                Code.FAILED_PRECONDITION,
                "server_options.batching_parameters_file is set without "
                "setting server_options.enable_batching to true.",
            )
        if (
            self.tensorflow_session_parallelism > 0
            and self.tensorflow_intra_op_parallelism > 0
            and self.tensorflow_inter_op_parallelism > 0
        ):
            raise ServingError(
                Code.FAILED_PRECONDITION,
                "Either configure server_options.tensorflow_session_parallelism or "
                "(server_options.tensorflow_intra_op_parallelism, server_options.tensorflow_inter_op_parallelism) "
                "separately. You cannot configure all.",
            )
        if self.rest_api_enable_ssl and not self.ssl_config_file:
            raise ServingError(Code.INVALID_ARGUMENT, "--rest_api_enable_ssl needs --ssl_config_file")
        self.worker_count()

    def pending_flags(self, given: set[str]) -> list[tuple[str, str]]:
        """Flags on the command line that this build accepts but does not honour, with the reason."""
        return [
            (f.name, f.metadata["pending"])
            for f in dataclasses.fields(self)
            if f.metadata["pending"] and f.name in given
        ]


class UsageError(PyservingError):
    """A bad flag value (the message says which) or --help (no message): print the usage."""


@dataclass
class ParseResult:
    options: Options
    unknown: list[str]
    given: set[str]


_INT_RANGES = {INT32: (-(2**31), 2**31 - 1), INT64: (-(2**63), 2**63 - 1)}


def _convert(kind: str, name: str, text: str) -> Any:
    if kind == "string":
        return text
    if kind == "bool":
        if text.lower() in ("true", "1", "false", "0"):
            return text.lower() in ("true", "1")
    elif kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        try:
            value = int(text, 10)
        except ValueError:
            value = None
        if value is not None and low <= value <= high and text.strip() == text:
            return value
    elif kind == "float":
        try:
            return float(text)
        except ValueError:
            pass
    raise UsageError(f"Couldn't interpret value {text} for flag {name}.")


def parse(argv: list[str]) -> ParseResult:
    """Parse argv (without the program name). Raises UsageError on --help or a bad value."""
    fields = {f.name: f for f in dataclasses.fields(Options)}
    options = Options()
    unknown: list[str] = []
    given: set[str] = set()
    for arg in argv:
        if arg == "--help":
            raise UsageError("")
        name, has_value, text = arg[2:].partition("=") if arg.startswith("--") else ("", False, "")
        spec = fields.get(name)
        if spec is None or (not has_value and spec.metadata["kind"] != "bool"):
            unknown.append(arg)
            continue
        value = _convert(spec.metadata["kind"], name, text) if has_value else True
        setattr(options, name, value)
        given.add(name)
    return ParseResult(options, unknown, given)


def usage(program: str = "tensorflow_model_server") -> str:
    lines = [f"usage: {program}", "Flags:"]
    for f in dataclasses.fields(Options):
        default = f.default
        if isinstance(default, bool):
            default = "true" if default else "false"
        elif isinstance(default, str):
            default = f'"{default}"'
        elif isinstance(default, float):
            default = f"{default:f}"
        left = f"--{f.name}={default}"
        lines.append(f"\t{left:<33}\t{f.metadata['kind']}\t{f.metadata['help']}")
    return "\n".join(lines) + "\n"
