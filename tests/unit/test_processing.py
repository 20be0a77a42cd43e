"""Python processing in-process: processing.py imports, the wrapper's signatures, checks, errors, pool and batching."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from helpers import DoublingServable
from tensorflow.core.framework import types_pb2

from pyserving import processing
from pyserving.errors import Code, ServingError
from pyserving.lifecycle.loader import LoaderChain
from pyserving.lifecycle.manager import VersionSpec
from pyserving.runtimes import registry
from pyserving.runtimes.batching import BatchedServable, Batcher, BatchingOptions
from pyserving.runtimes.python_processing import ProcessingPool, ProcessingServable, ProcessingSettings

PROCESSING = """
import numpy as np
from pyserving import processing

@processing.signature("quadruple", inputs={"x": ("float", [-1])}, outputs={"y": ("float", [-1]), "n": ("int64", [])})
def quadruple(model, x):
    twice = model.predict("double", {"x": x})["y"]
    return {"y": twice * 2, "n": len(x)}

@processing.signature("greet", inputs={"name": ("string", [-1])}, outputs={"text": ("string", [-1])})
def greet(model, name):
    if len(name) == 0:
        raise processing.InvalidArgument("nobody to greet")
    if name[0] == b"boom":
        raise KeyError("boom")
    if name[0] == b"exit":
        raise SystemExit(3)
    if name[0] == b"bad":
        return {"text": ["x"], "extra": [1]}
    return {"text": [f"hello {n.decode()} from {model.name} v{model.version}" for n in name]}

@processing.signature("rows", inputs={"x": ("float", [-1])}, outputs={"rows": ("int64", [-1])}, batched=True)
def rows(model, x):
    return {"rows": np.full(len(x), len(x))}
"""


@pytest.fixture()
def pool():
    pool = ProcessingPool(2)
    yield pool
    pool.stop()


def _version(tmp_path, text: str = PROCESSING, version: int = 1):
    folder = tmp_path / "m" / str(version)
    folder.mkdir(parents=True)
    (folder / "processing.py").write_text(textwrap.dedent(text))
    return folder


def _servable(tmp_path, pool, text: str = PROCESSING, inner=None, timeout_ms: int = 5000):
    folder = _version(tmp_path, text)
    inner = inner if inner is not None else DoublingServable()
    return ProcessingServable(inner, "m", 1, str(folder), ProcessingSettings(pool, timeout_ms))


def test_signatures_are_the_graphs_plus_the_declared_ones(tmp_path, pool):
    servable = _servable(tmp_path, pool)
    assert sorted(servable.signature_defs) == ["double", "greet", "quadruple", "rows"]
    quadruple = servable.signature_defs["quadruple"]
    assert quadruple.method_name == "tensorflow/serving/predict"
    assert quadruple.inputs["x"].dtype == types_pb2.DT_FLOAT
    assert [d.size for d in quadruple.inputs["x"].tensor_shape.dim] == [-1]
    assert quadruple.outputs["n"].dtype == types_pb2.DT_INT64
    assert list(quadruple.outputs["n"].tensor_shape.dim) == []
    assert servable.unbatched_signatures == frozenset({"quadruple", "greet"})
    assert servable.runtime == "numpy"


def test_a_function_calls_the_graph_and_its_outputs_come_in_alias_order(tmp_path, pool):
    servable = _servable(tmp_path, pool)
    y, n = servable.run("quadruple", {"x": np.array([1.0, 2.5], np.float32)}, ["y", "n"], 0)
    assert y.dtype == np.float32 and y.tolist() == [4.0, 10.0]
    assert n.dtype == np.int64 and n.tolist() == 2
    (text,) = servable.run("greet", {"name": np.array([b"ann"], object)}, ["text"], 0)
    assert text.dtype == object and text.tolist() == [b"hello ann from m v1"]


def test_errors_of_user_code_map_to_codes_and_one_line_messages(tmp_path, pool):
    servable = _servable(tmp_path, pool)
    with pytest.raises(ServingError) as bad:
        servable.run("greet", {"name": np.array([], object)}, ["text"], 0)
    assert (bad.value.code, bad.value.message) == (Code.INVALID_ARGUMENT, "nobody to greet")
    with pytest.raises(ServingError) as boom:
        servable.run("greet", {"name": np.array([b"boom"], object)}, ["text"], 0)
    assert (boom.value.code, boom.value.message) == (Code.INTERNAL, "KeyError: 'boom'")
    with pytest.raises(ServingError) as exit_:
        servable.run("greet", {"name": np.array([b"exit"], object)}, ["text"], 0)
    assert (exit_.value.code, exit_.value.message) == (Code.INTERNAL, "SystemExit: 3")
    with pytest.raises(ServingError) as extra:
        servable.run("greet", {"name": np.array([b"bad"], object)}, ["text"], 0)
    assert extra.value.code == Code.INTERNAL
    assert extra.value.message == (
        "Processing signature greet returned outputs ['extra', 'text']; it declares ['text'] "
        "(missing: [], extra: ['extra'])"
    )
    with pytest.raises(ServingError) as dtype:
        servable.run("greet", {"name": np.array([1.0], np.float32)}, ["text"], 0)
    assert (dtype.value.code, dtype.value.message) == (
        Code.INVALID_ARGUMENT,
        "input 'name' of signature greet is float32; it expects string",
    )
    with pytest.raises(ServingError) as number:
        servable.run("quadruple", {"x": np.array([1], np.int32)}, ["y"], 0)
    assert (number.value.code, number.value.message) == (
        Code.INVALID_ARGUMENT,
        "input 'x' of signature quadruple is int32; it expects float",
    )


def test_each_load_imports_its_own_module_and_close_removes_it(tmp_path, pool):
    first = _servable(tmp_path / "a", pool)
    second = _servable(tmp_path / "b", pool, PROCESSING.replace("hello", "bye"))
    names = [first._module_name, second._module_name]
    assert names[0] != names[1] and all(name in sys.modules for name in names)
    assert all(name.startswith("pyserving_processing_m_v1_") for name in names)
    greeting = {"name": np.array([b"x"], object)}
    assert first.run("greet", greeting, ["text"], 0)[0].tolist() == [b"hello x from m v1"]
    assert second.run("greet", greeting, ["text"], 0)[0].tolist() == [b"bye x from m v1"]
    first.close()
    second.close()
    assert not [name for name in names if name in sys.modules]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("def broken(:\n", "SyntaxError: invalid syntax (processing.py, line 1)"),
        ("import not_a_module_anywhere\n", "ModuleNotFoundError: No module named 'not_a_module_anywhere'"),
        (
            "from pyserving import processing\n"
            "@processing.signature('s', inputs={'x': ('floaty', [-1])}, outputs={'y': ('float', [-1])})\n"
            "def s(model, x):\n    return {'y': x}\n",
            "ValueError: processing.signature 's' input 'x': unknown dtype 'floaty'; expected one of "
            + ", ".join(sorted(processing.DTYPES)),
        ),
        ("x = 1\n", None),
    ],
)
def test_a_broken_file_fails_the_load_naming_it(tmp_path, pool, text, message):
    modules = set(sys.modules)
    with pytest.raises(ServingError) as failed:
        _servable(tmp_path, pool, text)
    file = tmp_path / "m" / "1" / "processing.py"
    assert failed.value.code == Code.INVALID_ARGUMENT
    if message is None:
        assert failed.value.message == f"{file} declares no signature (decorate functions with processing.signature)"
    else:
        assert failed.value.message.startswith(f"{file} failed to load: ")
        assert failed.value.message.endswith(message)
    assert not [name for name in set(sys.modules) - modules if name.startswith("pyserving_processing_")]


def test_a_signature_the_graph_already_has_fails_the_load(tmp_path, pool):
    text = (
        "from pyserving import processing\n"
        "@processing.signature('double', inputs={'x': ('float', [-1])}, outputs={'y': ('float', [-1])})\n"
        "def d(model, x):\n    return {'y': x}\n"
    )
    with pytest.raises(ServingError) as failed:
        _servable(tmp_path, pool, text)
    file = tmp_path / "m" / "1" / "processing.py"
    assert failed.value.message == f"{file} declares signature 'double', which the model already has"


def test_run_async_is_bounded_and_abandoned_threads_make_new_calls_fail_fast(tmp_path, pool):
    text = (
        "import threading\nfrom pyserving import processing\nGATE = threading.Event()\n"
        "@processing.signature('wait', inputs={'x': ('float', [-1])}, outputs={'y': ('float', [-1])})\n"
        "def wait(model, x):\n    GATE.wait(30)\n    return {'y': x}\n"
    )
    servable = _servable(tmp_path, pool, text)
    module = sys.modules[servable._module_name]
    x = {"x": np.ones(1, np.float32)}

    async def call(timeout_ms):
        return await servable.run_async("wait", x, ["y"], timeout_ms)

    for _ in range(2):  # both threads end up held
        started = time.monotonic()
        with pytest.raises(ServingError) as late:
            asyncio.run(call(200))
        assert 0.15 < time.monotonic() - started < 2
        assert (late.value.code, late.value.message) == (
            Code.DEADLINE_EXCEEDED,
            "Processing signature wait of model m version 1 did not return within 200 ms",
        )
    with pytest.raises(ServingError) as full:
        asyncio.run(call(200))
    assert (full.value.code, full.value.message) == (
        Code.UNAVAILABLE,
        "All 2 Python processing threads are still running calls that passed their deadline; "
        "Python processing is unavailable until one returns",
    )
    assert servable.run("double", x, ["y"], 0)[0].tolist() == [2.0]  # the graph still answers
    module.GATE.set()
    time.sleep(0.3)  # the held threads return
    assert asyncio.run(call(2000))[0].tolist() == [1.0]


def test_batched_signatures_are_merged_and_per_request_ones_pass_through(tmp_path, pool):
    gate = threading.Event()
    inner = DoublingServable(gate)
    batcher = Batcher(BatchingOptions(max_batch_size=8, batch_timeout_micros=200_000))
    try:
        servable = _servable(tmp_path, pool, inner=inner)
        batched = BatchedServable(servable, batcher, batcher.options)
        servable.graph_runner = batched

        async def calls():
            rows = [batched.run_async("rows", {"x": np.ones(1, np.float32)}, ["rows"], 0) for _ in range(3)]
            quad = batched.run_async("quadruple", {"x": np.ones(2, np.float32)}, ["y", "n"], 0)
            gate.set()
            return await asyncio.gather(*rows, quad)

        *rows, quad = asyncio.run(calls())
        assert [r[0].tolist() for r in rows] == [[3], [3], [3]]  # one call of 3 merged rows
        assert quad[0].tolist() == [4.0, 4.0]
        assert inner.runs == [2]  # quadruple's graph call went through the batcher on its own
    finally:
        batcher.stop()


def test_the_loader_chain_wraps_only_with_the_flag_and_pure_python_needs_it(tmp_path, pool, caplog):
    folder = _version(tmp_path)
    spec = VersionSpec("m", 1, str(folder), registry.PYTHON_PLATFORM)
    with pytest.raises(ServingError) as off:
        LoaderChain(registry.RuntimeOptions())(spec)
    assert (off.value.code, off.value.message) == (
        Code.FAILED_PRECONDITION,
        f"{folder / 'processing.py'} is a pure-Python model: it is served only with --enable_python_processing "
        "(code in a model folder runs with the server's rights)",
    )
    chain = LoaderChain(registry.RuntimeOptions(), processing=ProcessingSettings(pool, 1000))
    servable = chain(spec)
    assert isinstance(servable, ProcessingServable)
    assert servable.runtime == "Python"
    assert sorted(servable.signature_defs) == ["greet", "quadruple", "rows"]
    servable.close()
    assert registry.detect(str(folder)) == "python"


class _Leased:
    """What the resolver hands out: a leased version (here, without a manager)."""

    def __init__(self, servable, version: int) -> None:
        self.servable, self.version = servable, version

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return None


def test_a_batched_function_calls_another_batched_model_without_waiting_for_a_batch(tmp_path, pool):
    """One batch thread: a batched function (on it) that waited for another model's batch would wait forever."""
    text = (
        "from pyserving import processing\n"
        "@processing.signature('relay', inputs={'x': ('float', [-1])}, outputs={'y': ('float', [-1])}, batched=True)\n"
        "def relay(model, x):\n"
        "    return {'y': model.predict('double', {'x': x}, model_name='other')['y'] + 1}\n"
    )
    batcher = Batcher(BatchingOptions(max_batch_size=8, num_batch_threads=1))
    try:
        other_inner = DoublingServable()
        other = BatchedServable(other_inner, batcher, batcher.options)
        settings = ProcessingSettings(pool, 5000, lambda name, version: _Leased(other, 1))
        folder = _version(tmp_path, text)
        relay = ProcessingServable(DoublingServable(), "m", 1, str(folder), settings)
        batched = BatchedServable(relay, batcher, batcher.options)
        relay.graph_runner = batched

        async def call():
            return await asyncio.wait_for(
                batched.run_async("relay", {"x": np.array([1.0, 2.0], np.float32)}, ["y"], 0), 10
            )

        assert asyncio.run(call())[0].tolist() == [3.0, 5.0]
        assert other_inner.runs == [2]
    finally:
        batcher.stop()
