"""`--num_workers` 1 against N: compare.py's tiny-model points (batching, REST and gRPC) and every process's RSS.

Both servers run side by side for the whole run and take turns point by point (1 then N, then N then 1),
so a slow moment of a shared machine falls on both. Each point is wrk (REST) or h2load (gRPC) with
compare.py's batch-1 request; the median of the repeats is reported, with the RSS of every process of each
server after the load (supervisor, model process, workers). Writes bench/results/<time>-workers.md.

    python bench/workers.py [--workers 2] [--connections 64] [--seconds 5] [--repeats 3] [--cpus 0,1]

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
    parser.add_argument("--connections", default="64")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", default="", help="pin each server to these CPUs (taskset -c)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pyserving-bench-workers-"))
    model = export_models(work)["tiny"]
    alias, row = one_row(model)
    (work / "batching.config").write_text(BATCHING)
    counts = [1, args.workers]
    rows = ["pyserving REST batching", "pyserving gRPC batching"]
    results: dict[tuple[str, int, int], dict] = {}
    rss: dict[int, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for count in counts:
            flags = (f"--num_workers={count}",)
            url, grpc_port = stack.enter_context(serve("pyserving batching", model, work, flags))
            servers[count] = (url, grpc_port)
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
        for conns in [int(c) for c in args.connections.split(",")]:
            for server in rows:
                runs: dict[int, list[dict]] = {count: [] for count in counts}
                for repeat in range(args.repeats):
                    for count in counts if repeat % 2 == 0 else counts[::-1]:
                        url, grpc_port = servers[count]
                        runs[count].append(load_point(server, url, grpc_port, alias, row, conns, args.seconds, work))
                for count in counts:
                    point = median_point(runs[count])
                    point["runs"] = [run["rps"] for run in runs[count]]
                    results[(server, conns, count)] = point
                    print(server, conns, count, point, flush=True)
        for count, (url, _) in servers.items():
            port = url.rsplit(":", 1)[1]
            pid = _listener_pid(port)
            rss[count] = _tree(pid) if pid else {}
    lines = [
        f"# --num_workers 1 vs {args.workers} ({datetime.datetime.now():%Y-%m-%d %H:%M})",
        "",
        f"tiny model (half_plus_two), batching ({BATCHING}), batch-1 requests; {args.seconds:g} s x {args.repeats} "
        f"per point, the servers taking turns; CPUs: {args.cpus or 'all'}.",
        "",
        "| row | connections | workers | req/s (median) | p50 ms | p99 ms | errors | runs | vs 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (server, conns, count), point in results.items():
        base = results[(server, conns, 1)]["rps"]
        runs = ", ".join(f"{r:.0f}" for r in point["runs"])
        lines.append(
            f"| {server} | {conns} | {count} | {point['rps']:.0f} | {point['p50']:.2f} | {point['p99']:.2f} | "
            f"{point['errors']:.0f} | {runs} | {point['rps'] / base:.2f}x |"
        )
    lines += ["", "RSS after the load (MiB):", ""]
    for count, sizes in rss.items():
        lines.append(f"- `--num_workers={count}`: " + ", ".join(f"{role} {size:.0f}" for role, size in sizes.items()))
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
