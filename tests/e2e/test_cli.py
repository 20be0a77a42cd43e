"""Command line: flags, usage, version and start-up failures, as tensorflow_model_server."""

import time

from helpers import HALF_PLUS_TWO, MODELS, bad_model_start_error, run_cli


def test_version_prints_both_lines_and_exits_zero():
    result = run_cli("--version")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0] == "TensorFlow ModelServer: 0.1.0-pyserving"
    assert lines[1] == "TensorFlow Library: 2.21.0"


def test_help_prints_usage_to_stdout_and_exits_255():
    result = run_cli("--help", program="tensorflow_model_server")
    assert result.returncode == 255
    assert result.stdout.startswith("usage: tensorflow_model_server\nFlags:\n")
    assert "\t" + "--port=8500".ljust(33) + "\tint32\t" in result.stdout
    assert '\t--model_name="default"' in result.stdout
    assert "\t--per_process_gpu_memory_fraction=0.000000" in result.stdout
    assert "Commands" not in result.stdout  # exactly TF Serving's usage


def test_pyserving_help_also_lists_the_tools_and_each_tool_describes_itself():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: pyserving\nFlags:\n")
    commands = result.stdout.split("\nCommands (`pyserving COMMAND --help` for each):\n")[1].splitlines()
    assert [line.split()[0] for line in commands] == ["example", "inspect", "convert", "warmup"]
    assert commands[0] == "\texample   \texport the getting-started model (half_plus_two) to serve"
    for command, words in (
        ("example", "y = 0.5 * x + 2"),
        ("inspect", "nothing is loaded or run"),
        ("convert", "renamed into <export_base>/<version>"),
        ("warmup", "replay before"),
    ):
        help_text = run_cli(command, "--help")
        assert help_text.returncode == 0
        assert words in " ".join(help_text.stdout.split()), help_text.stdout


def test_usage_lists_every_tensorflow_model_server_flag():
    usage = run_cli("--help", program="tensorflow_model_server").stdout
    names = [line.split("=", 1)[0].strip().lstrip("-") for line in usage.splitlines()[2:]]
    # TF Serving's 48 flags plus pyserving's 21 (host, drain delay, grace, body and head limits, decoded tensor
    # limit, read timeout, TLS, custom op libraries and modules, model platform, Python processing, its threads
    # and its timeout, the object-store model cache, the extra metrics path, tracing, protocol workers, codec
    # processes and their threshold)
    assert len(names) == 69
    for name in (
        "grpc_socket_path",
        "rest_api_timeout_in_ms",
        "enable_grpc_healthcheck_service",
        "model_config_file_poll_wait_seconds",
        "load_retry_interval_micros",
        "enable_per_model_batching_parameters",
        "thread_pool_factory_config_file",
        "enable_serialization_as_tensor_content",
        "skip_initialize_tpu",
        "mixed_precision",
        "num_workers",
        "metrics_path",
        "enable_tracing",
        "rest_api_codec_process_min_bytes",
        "rest_api_codec_processes",
    ):
        assert name in names


def test_bad_flag_value_prints_error_and_usage_and_exits_255():
    result = run_cli("--port=abc", f"--model_base_path={HALF_PLUS_TWO}", program="tensorflow_model_server")
    assert result.returncode == 255
    assert "Couldn't interpret value abc for flag port." in result.stderr
    assert result.stdout.startswith("usage: tensorflow_model_server")


def test_bad_bool_value_exits_255():
    result = run_cli("--enable_batching=maybe", f"--model_base_path={HALF_PLUS_TWO}")
    assert result.returncode == 255
    assert "Couldn't interpret value maybe for flag enable_batching." in result.stderr


def test_missing_base_path_and_config_fails_with_tf_serving_message():
    result = run_cli("--port=0", "--rest_api_port=0")
    assert result.returncode == 255
    assert result.stdout.strip() == (
        "Failed to start server. Error: INVALID_ARGUMENT: Both "
        "server_options.model_base_path and server_options.model_config_file are empty!"
    )


def test_batching_file_without_batching_is_a_startup_error():
    result = run_cli(f"--model_base_path={HALF_PLUS_TWO}", "--batching_parameters_file=/tmp/x.txt")
    assert result.returncode == 255
    assert (
        "server_options.batching_parameters_file is set without setting "
        "server_options.enable_batching to true." in result.stdout
    )


def test_all_three_parallelism_flags_is_a_startup_error():
    result = run_cli(
        f"--model_base_path={HALF_PLUS_TWO}",
        "--tensorflow_session_parallelism=1",
        "--tensorflow_intra_op_parallelism=1",
        "--tensorflow_inter_op_parallelism=1",
    )
    assert result.returncode == 255
    assert "You cannot configure all." in result.stdout


def test_bad_model_fails_startup_with_clear_error():
    result = run_cli(
        "--port=0",
        "--grpc_socket_path=/tmp/pyserving-bad.sock",
        "--model_name=bad",
        f"--model_base_path={MODELS / 'bad_half_plus_two'}",
        "--max_num_load_retries=0",
    )
    assert result.returncode == 255
    assert result.stdout.strip() == bad_model_start_error()


def test_load_retries_follow_the_flags():
    started = time.monotonic()
    result = run_cli(
        "--model_name=bad",
        f"--model_base_path={MODELS / 'bad_half_plus_two'}",
        "--max_num_load_retries=2",
        "--load_retry_interval_micros=500000",
        "--port=0",
        "--grpc_socket_path=/tmp/pyserving-bad2.sock",
    )
    assert result.returncode == 255
    assert result.stderr.count("Retrying of Loading servable: {name: bad version: 123} retry: ") == 2
    assert result.stderr.count("Loading servable: {name: bad version: 123} failed: NOT_FOUND: ") == 3
    assert time.monotonic() - started >= 1.0


def test_no_numeric_version_and_no_polling_fails_clearly(tmp_path):
    (tmp_path / "not_a_version").mkdir()
    result = run_cli("--model_name=empty", f"--model_base_path={tmp_path}", "--file_system_poll_wait_seconds=0")
    assert result.returncode == 255
    assert (
        "No versions of servable empty found under base path "
        f"{tmp_path}. Did you forget to name your leaf directory as a number (eg. '/1/')?"
    ) in result.stderr
    assert result.stdout.startswith("Failed to start server. Error: NOT_FOUND: No versions of servable empty")


def test_unknown_saved_model_tags_fail_the_load():
    result = run_cli(
        "--model_name=m",
        f"--model_base_path={HALF_PLUS_TWO}",
        "--saved_model_tags=gpu",
        "--max_num_load_retries=0",
        "--port=0",
        "--grpc_socket_path=/tmp/pyserving-tags.sock",
    )
    assert result.returncode == 255
    assert result.stdout.startswith(
        "Failed to start server. Error: UNKNOWN: 1 servable(s) did not become "
        "available: {{{name: m version: 123} due to error: "
    )
    assert "gpu" in result.stdout


def test_unknown_argument_is_reported_and_startup_continues():
    result = run_cli("--bogus=1", "--port=0", "--rest_api_port=0", program="tensorflow_model_server")
    assert result.stdout.startswith("unknown argument: --bogus=1\nusage: tensorflow_model_server\n")
    assert "Both server_options.model_base_path" in result.stdout  # it went on to start-up checks
    assert result.returncode == 255
