"""`--num_workers` 1 against N: compare.py's tiny-model points (REST, gRPC, V2 REST, V2 gRPC; batching off at
16 connections, on at 64) and every process's RSS.

The servers run side by side for the whole run and take turns point by point (1 then N, then N then 1),
so a slow moment of a shared machine falls on both. Each point is wrk (REST) or h2load (gRPC) with
compare.py's batch-1 request; the median of the repeats is reported, with the RSS of every process of each
server after the load (supervisor, model process, workers). Writes bench/results/<time>-workers.md.

    PYTHONPATH=src python bench/workers.py [--workers 2] [--rows ROW,...] [--seconds 5] [--repeats 3] [--cpus 0,1]

PYTHONPATH=src: the servers run `python -m pyserving` (an installed pyserving elsewhere would be measured).

`--cpus` pins each server's processes to those CPUs (taskset), for a 2-core figure on a bigger machine.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import shutil
import subprocess
import tempfile
from pathlib import Path

from compare import BATCHING, HERE, _check_grpc, _check_rest, export_models, load_point, median_point, one_row, serve

# compare.py's tiny-model rows: batching off at 16 connections, on at 64 (issue 23's targets).
ROWS = [
    "pyserving REST",
    "pyserving gRPC",
    "pyserving V2 REST",
    "pyserving V2 gRPC",
    "pyserving REST batching",
    "pyserving gRPC batching",
    "pyserving V2 REST batching",
    "pyserving V2 gRPC batching",
]


def _kind(row: str) -> str:
    """The server process a row runs against (`compare.serve`'s kind)."""
    return "pyserving batching" if row.endswith("batching") else "pyserving"


def _children(pid: int) -> list[int]:
    return [child for child in _roles(pid).values()]


def _tree(pid: int) -> dict[str, float]:
    """RSS (MiB) of `pid` and its pyserving children, by role."""
    return {"server": _rss(pid), **{role: _rss(child) for role, child in _roles(pid).items()}}


def _roles(pid: int) -> dict[str, int]:
    """`pid`'s `--num_workers` children by role (model, worker 0...)."""
    roles = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == pid and b"pyserving.workers" in cmdline:
            role = " ".join(p.decode() for p in cmdline[cmdline.index(b"pyserving.workers") + 1 :] if p)
            roles[role] = int(entry.name)
    return roles


def _rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rows", help="comma-separated subset of the rows (default: every tiny-model row)")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", default="", help="pin each server to these CPUs (taskset -c)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyserving-bench-workers-"))
    model = export_models(work)["tiny"]
    alias, row = one_row(model)
    counts = [1, args.workers]
    rows = args.rows.split(",") if args.rows else ROWS
    results: dict[tuple[str, int], dict] = {}
    rss: dict[tuple[str, int], dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        servers: dict[tuple[str, int], tuple[str, int]] = {}  # (kind, workers) -> (REST url, gRPC port)
        for kind in sorted({_kind(row_) for row_ in rows}):
            for count in counts:
                flags = (f"--num_workers={count}",)
                servers[(kind, count)] = stack.enter_context(serve(kind, model, work, flags))
        if args.cpus:  # this run's servers only: their pids and their children's
            for url, _ in servers.values():
                pid = _listener_pid(url.rsplit(":", 1)[1])
                for child in [pid, *_children(pid)] if pid else []:
                    subprocess.run(
                        ["taskset", "-a", "-p", "-c", args.cpus, str(child)], capture_output=True, check=True
                    )
        for url, grpc_port in servers.values():
            _check_rest("pyserving REST", url, alias, row)
            _check_grpc(grpc_port, alias, row)
        for name in rows:
            conns = 64 if name.endswith("batching") else 16
            runs: dict[int, list[dict]] = {count: [] for count in counts}
            for repeat in range(args.repeats):
                for count in counts if repeat % 2 == 0 else counts[::-1]:
                    url, grpc_port = servers[(_kind(name), count)]
                    runs[count].append(load_point(name, url, grpc_port, alias, row, conns, args.seconds, work))
            for count in counts:
                point = median_point(runs[count])
                point["runs"] = [run["rps"] for run in runs[count]]
                point["connections"] = conns
                results[(name, count)] = point
                print(name, conns, count, point, flush=True)
        for (kind, count), (url, _) in servers.items():
            pid = _listener_pid(url.rsplit(":", 1)[1])
            rss[(kind, count)] = _tree(pid) if pid else {}
    lines = [
        f"# --num_workers 1 vs {args.workers} ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"tiny model (half_plus_two), batch-1 requests; no batching at 16 connections, batching ({BATCHING}) at "
        f"64; {args.seconds:g} s x {args.repeats} per point, the servers taking turns; CPUs: {args.cpus or 'all'}.",
        "",
        "| row | connections | workers | req/s (median) | p50 ms | p99 ms | errors | runs | vs 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (server, count), point in results.items():
        base, conns = results[(server, 1)]["rps"], point["connections"]
        runs = ", ".join(f"{r:.0f}" for r in point["runs"])
        lines.append(
            f"| {server} | {conns} | {count} | {point['rps']:.0f} | {point['p50']:.2f} | {point['p99']:.2f} | "
            f"{point['errors']:.0f} | {runs} | {point['rps'] / base:.2f}x |"
        )
    lines += ["", "RSS after the load (MiB):", ""]
    for (kind, count), sizes in rss.items():
        lines.append(
            f"- {kind}, `--num_workers={count}`: " + ", ".join(f"{role} {size:.0f}" for role, size in sizes.items())
        )
    report = "\n".join(lines) + "\n"
    out = HERE / "results" / f"{datetime.datetime.now():%Y-%m-%d-%H%M}-workers.md"
    out.write_text(report)
    print(report)
    print(f"written to {out}")
    shutil.rmtree(work, ignore_errors=True)


def _listener_pid(port: str) -> int | None:
    """The pid of the server process started for the REST `port` (its command line names it)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if f"--rest_api_port={port}".encode() in cmdline and b"-m\0pyserving\0" in cmdline:
                return int(entry.name)
    return None


if __name__ == "__main__":
    main()
