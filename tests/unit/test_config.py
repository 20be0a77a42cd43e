"""Flags with TF's parse rules, start-up checks, and model config files with TF Serving's validation."""

from __future__ import annotations

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from pyserving import config_protos, flags
from pyserving.errors import Code, ServingError
from pyserving.lifecycle import model_config
from pyserving.lifecycle.model_config import ModelConfig, VersionPolicy


def test_flag_forms_follow_tfs_rules():
    parsed = flags.parse(
        [
            "--port=9000",
            "--enable_batching",
            "--rest_api_enable_cors_support=TRUE",
            "--model_name=a",
            "--model_name=b",
            "--file_system_poll_wait_seconds=0",
            "stray",
            "--port",
        ]
    )
    options = parsed.options
    assert (options.port, options.enable_batching, options.rest_api_enable_cors_support) == (9000, True, True)
    assert options.model_name == "b"  # the last repeat wins
    assert parsed.unknown == ["stray", "--port"]  # a non-boolean flag needs =value
    assert parsed.given == {
        "port",
        "enable_batching",
        "rest_api_enable_cors_support",
        "model_name",
        "file_system_poll_wait_seconds",
    }


@pytest.mark.parametrize("arg", ["--port=abc", "--port=2147483648", "--port= 1", "--enable_batching=maybe", "--help"])
def test_bad_values_and_help_are_usage_errors(arg):
    with pytest.raises(flags.UsageError):
        flags.parse([arg])


def test_usage_lists_every_flag_with_its_default_and_type():
    usage = flags.usage()
    assert usage.startswith("usage: tensorflow_model_server\nFlags:\n")
    assert "\t" + "--port=8500".ljust(33) + "\tint32\tPort to listen on for gRPC API" in usage
    assert '\t--model_name="default"' in usage


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "INVALID_ARGUMENT: Both server_options.model_base_path and server_options.model_config_file are empty!"),
        (["--model_base_path=/m", "--port=0"], "INVALID_ARGUMENT: server_options.grpc_port is not set."),
        (
            ["--model_base_path=/m", "--batching_parameters_file=/b"],
            "FAILED_PRECONDITION: server_options.batching_parameters_file is set without setting "
            "server_options.enable_batching to true.",
        ),
        (
            ["--model_base_path=/m", "--rest_api_enable_ssl"],
            "INVALID_ARGUMENT: --rest_api_enable_ssl needs --ssl_config_file",
        ),
    ],
)
def test_start_up_checks(args, message):
    with pytest.raises(ServingError) as info:
        flags.parse(args).options.validate()
    assert str(info.value) == message


def test_pending_flags_are_named_only_when_given():
    options = flags.parse(["--model_base_path=/m", "--use_alts_credentials=false"]).options
    assert [name for name, _ in options.pending_flags({"use_alts_credentials", "port"})] == ["use_alts_credentials"]


def _config(text: str) -> list[ModelConfig]:
    return model_config.from_proto(text_format.Parse(text, model_server_config_pb2.ModelServerConfig()))


def test_model_config_file_values():
    configs = _config(
        'model_config_list { config { name: "a" base_path: "/m/a" model_platform: "tensorflow" '
        "model_version_policy { specific { versions: 1 versions: 2 } } "
        'version_labels { key: "stable" value: 1 } } '
        'config { name: "b" base_path: "s3://bucket/b" model_platform: "tensorflow" '
        "model_version_policy { latest { num_versions: 2 } } } }"
    )
    assert configs == [
        ModelConfig("a", "/m/a", VersionPolicy("specific", versions=(1, 2)), {"stable": 1}, "tensorflow"),
        ModelConfig("b", "s3://bucket/b", VersionPolicy("latest", num_versions=2), {}, "tensorflow"),
    ]


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (
            'config { name: "a" base_path: "/a" model_platform: "tensorflow" } '
            'config { name: "a" base_path: "/b" model_platform: "tensorflow" }',
            "Illegal to list model a multiple times in config list",
        ),
        (
            'config { name: "a" base_path: "rel" model_platform: "tensorflow" }',
            "Expected model a to have an absolute path or URI; got base_path()=rel",
        ),
        (
            'config { name: "a" base_path: "/a\\000b" model_platform: "tensorflow" }',
            "Expected model a to have a base_path without NUL bytes; got base_path()=/a\\000b",
        ),
        (
            'config { name: "a" base_path: "/a" }',
            "Illegal setting neither ModelServerConfig::model_type (deprecated) nor ModelServerConfig::model_platform.",
        ),
        (
            'config { name: "a" base_path: "/a" model_platform: "pytorch" }',
            "Model a requests unsupported platform pytorch",
        ),
        (
            'config { name: "a" base_path: "/a" model_platform: "tensorflow" model_type: TENSORFLOW }',
            "Illegal setting both ModelServerConfig::model_type (deprecated) and ModelServerConfig::model_platform.",
        ),
    ],
)
def test_model_config_errors_are_tf_servings(entries, message):
    with pytest.raises(ServingError) as info:
        _config(f"model_config_list {{ {entries} }}")
    assert (info.value.code, info.value.message) == (Code.INVALID_ARGUMENT, message)


def test_deprecated_model_type_still_means_tensorflow():
    assert _config('model_config_list { config { name: "a" base_path: "/a" model_type: TENSORFLOW } }')[0].platform == (
        "tensorflow"
    )


def test_config_files_parse_with_tfs_errors(tmp_path):
    path = tmp_path / "batching.config"
    path.write_text("max_batch_size { value: 16 } allowed_batch_sizes: 8 allowed_batch_sizes: 16")
    parsed = config_protos.parse_file(str(path), config_protos.BatchingParameters)
    assert (parsed.max_batch_size.value, list(parsed.allowed_batch_sizes)) == (16, [8, 16])
    path.write_text("max_batch_size: oops")
    with pytest.raises(ServingError) as info:
        config_protos.parse_file(str(path), config_protos.BatchingParameters)
    assert info.value.message == f"Invalid protobuf file: '{path}'"
    with pytest.raises(ServingError) as info:
        config_protos.parse_file(str(tmp_path / "none"), config_protos.SSLConfig)
    assert (info.value.code, info.value.message) == (Code.NOT_FOUND, f"{tmp_path / 'none'}; No such file or directory")


def test_max_decoded_tensor_bytes_defaults_to_2_gib_or_a_quarter_of_memory():
    memory = flags._memory_bytes()
    assert memory > 0
    assert flags.Options().max_decoded_tensor_bytes == min(2**31, memory // 4)
    assert flags.parse(["--max_decoded_tensor_bytes=1000"]).options.max_decoded_tensor_bytes == 1000
    assert "\t--max_decoded_tensor_bytes=" in flags.usage()
