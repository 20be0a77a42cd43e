"""Tracing's start-up: off imports nothing from OpenTelemetry; on, missing packages and disabled SDKs are clear."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from pyserving import flags

# Run in a fresh interpreter: which modules get imported, and the global tracer provider, are per process.
_PROBE = textwrap.dedent(
    """
    import json, os, sys
    import pyserving.server  # every layer that calls tracing
    from pyserving import tracing
    from pyserving.errors import ServingError

    report = {}
    tracing.setup(False)
    report["off"] = [tracing.enabled, sorted(m for m in sys.modules if m.startswith("opentelemetry"))]
    os.environ["OTEL_SDK_DISABLED"] = "true"
    tracing.setup(True)
    report["sdk_disabled"] = tracing.enabled
    del os.environ["OTEL_SDK_DISABLED"]
    sys.modules["opentelemetry.sdk"] = None  # as if pyserving[tracing] were not installed
    try:
        tracing.setup(True)
    except ServingError as exc:
        report["missing"] = str(exc)
    print(json.dumps(report))
    """
)


def test_enable_tracing_flag_is_off_by_default():
    assert flags.Options().enable_tracing is False
    assert flags.parse(["--enable_tracing"]).options.enable_tracing is True
    assert "\t--enable_tracing=false" in flags.usage()


def test_off_imports_no_opentelemetry_and_missing_packages_name_the_extra():
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["off"] == [False, []]
    assert report["sdk_disabled"] is False
    assert report["missing"] == (
        "FAILED_PRECONDITION: --enable_tracing needs the OpenTelemetry SDK: pip install 'pyserving[tracing]' "
        "(No module named 'opentelemetry.sdk.resources'; 'opentelemetry.sdk' is not a package)"
    )
