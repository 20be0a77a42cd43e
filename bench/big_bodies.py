"""Big REST bodies against everyone else: how long small calls wait while big bodies are parsed and answered.

Two servers of the tiny model run side by side: codec processes on (the default) and off
(`--rest_api_codec_process_min_bytes=0`: big bodies parsed and answered in the serving process). For each
attack, a Python client posts big bodies back to back while wrk (REST) or h2load (gRPC) sends compare.py's
batch-1 predict over 4 connections; the small calls' p50, p99 and worst latency are what one big client costs
the others. Attacks: a 19 MiB body with an error (`signature_name` a number, 10 M integers: issue 20, item 7),
a valid 19 MiB predict (5 M floats in, a 28.6 MiB answer), and a 12 MiB V2 JSON infer (2.5 M floats, a 10 MiB
JSON answer). The servers take turns point by point;
medians of the repeats. Writes bench/results/<time>-big-bodies.md.

    PYTHONPATH=src python bench/big_bodies.py [--seconds 6] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests
from compare import HERE, export_models, grpc_call_for, h2load, median_point, one_row, request_for, serve, wrk

COUNT = 5_000_000
ATTACKS = {
    "none": b"",
    "error body 19 MiB": b'{"signature_name": 5, "inputs": [' + b"1," * (2 * COUNT - 1) + b"1]}",
    "valid predict 19 MiB": b'{"instances": [' + b"1.5," * (COUNT - 1) + b"1.5]}",
    "V2 infer 12 MiB": (
        b'{"inputs": [{"name": "x", "shape": [%d, 1], "datatype": "FP32", "data": [' % (COUNT // 2)
        + b"1.5, " * (COUNT // 2 - 1)
        + b"1.5]}]}"
    ),
}
# Where each attack posts (the tiny model's TF Serving predict, or its V2 infer).
PATHS = {attack: "/v2/models/m/infer" if attack.startswith("V2") else "/v1/models/m:predict" for attack in ATTACKS}
SERVERS = {"codec process": (), "in process": ("--rest_api_codec_process_min_bytes=0",)}
VICTIMS = ["REST", "gRPC"]


def _attack(url: str, body: bytes, stop: threading.Event, seconds: list[float]) -> None:
    session = requests.Session()
    while not stop.is_set():
        started = time.monotonic()
        session.post(url, data=body, timeout=300)
        seconds.append(time.monotonic() - started)


def point(
    base: str, grpc_port: int, attack: str, victim: str, alias: str, row: np.ndarray, seconds: float, work: Path
) -> dict:
    """One victim run while `attack` is posted back to back; the big calls' median seconds as `big_s`."""
    stop, big = threading.Event(), []
    attacker = threading.Thread(target=_attack, args=(base + PATHS[attack], ATTACKS[attack], stop, big))
    if ATTACKS[attack]:
        attacker.start()
        time.sleep(0.5)  # the first big body is under way
    try:
        if victim == "gRPC":
            path, body = grpc_call_for("pyserving gRPC", alias, row)
            result = h2load(grpc_port, body, 4, seconds, work, path)
        else:
            path, body = request_for("pyserving REST", alias, row)
            result = wrk(base + path, body, 4, seconds, work)
    finally:
        stop.set()
        if ATTACKS[attack]:
            attacker.join()
    return {**result, "big_s": statistics.median(big) if big else float("nan")}


def _codec_rss() -> list[float]:
    """RSS (MiB) of the codec processes of this run's servers (children of this process's children)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or b"pyserving.workers\0codec" not in (entry / "cmdline").read_bytes():
                continue
            status = dict(line.split(":", 1) for line in (entry / "status").read_text().splitlines() if ":" in line)
            parent = (Path("/proc") / status["PPid"].strip() / "status").read_text()
            if f"PPid:\t{os.getpid()}\n" in parent:
                found.append(int(status["VmRSS"].split()[0]) / 1024)
        except OSError:
            continue
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyserving-bench-"))
    model = export_models(work)["tiny"]
    alias, row = one_row(model)
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for name in SERVERS:
        (work / name.replace(" ", "-")).mkdir()
    with contextlib.ExitStack() as stack:
        servers = {
            name: stack.enter_context(serve("pyserving", model, work / name.replace(" ", "-"), extra))
            for name, extra in SERVERS.items()
        }
        for base, _ in servers.values():  # start the codec process before measuring
            requests.post(base + "/v1/models/m:predict", data=ATTACKS["error body 19 MiB"], timeout=300)
        for repeat in range(args.repeats):
            for attack in ATTACKS:
                for victim in VICTIMS:
                    order = list(servers) if repeat % 2 == 0 else list(reversed(servers))
                    for name in order:
                        base, grpc_port = servers[name]
                        result = point(base, grpc_port, attack, victim, alias, row, args.seconds, work)
                        runs.setdefault((attack, victim, name), []).append(result)
                        print(attack, victim, name, {k: round(v, 2) for k, v in result.items()}, flush=True)
        codec_rss = _codec_rss()
    lines = [
        f"# Big REST bodies against small calls ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"tiny model; small calls: 4 connections, {args.seconds:g} s per point, median of {args.repeats}; "
        "latencies in ms, big calls in s.",
        "",
        "| attack | small calls | server | req/s | p50 | p99 | max | big call | max vs in process |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for attack in ATTACKS:
        for victim in VICTIMS:
            medians = {name: median_point(runs[(attack, victim, name)]) for name in SERVERS}
            for name, m in medians.items():
                ratio = m["max"] / medians["in process"]["max"]
                lines.append(
                    f"| {attack} | {victim} | {name} | {m['rps']:.0f} | {m['p50']:.2f} | {m['p99']:.2f} | "
                    f"{m['max']:.1f} | {m['big_s']:.2f} | {ratio:.2f}x |"
                )
    lines += ["", f"Codec processes' RSS at the end: {', '.join(f'{rss:.0f} MiB' for rss in codec_rss)}"]
    text = "\n".join(lines) + "\n"
    out = HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d-%H%M}-big-bodies.md"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
