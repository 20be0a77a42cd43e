"""The `--num_workers` supervisor: the process the user started. It starts the model process, then the
protocol workers, restarts a worker that dies, stops everything when the model process dies, and turns
SIGTERM/SIGINT into the single process's drain (workers first, then the models). It never imports
TensorFlow: its memory is a plain Python process's.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from types import FrameType

from pyserving.flags import Options

__all__ = ["ARGV_ENV", "DIR_ENV", "PARENT_ENV", "READY_FD_ENV", "die_with_parent", "run"]

log = logging.getLogger("pyserving")

ARGV_ENV = "PYSERVING_WORKERS_ARGV"  # the command line, re-parsed by each child
DIR_ENV = "PYSERVING_WORKERS_DIR"  # the private run directory: the model socket, generation, tensor files
PARENT_ENV = "PYSERVING_WORKERS_PARENT"  # the supervisor's pid, which a child checks is still its parent
READY_FD_ENV = "PYSERVING_WORKERS_READY_FD"  # where the model process writes one byte once its models loaded
_POLL_S = 0.05
_RESTART_BACKOFF_S = 1.0  # a worker that died sooner than this after its start waits this long to restart
_MODEL_STOP_S = 60.0
_PR_SET_PDEATHSIG = 1
_RUN_PREFIX = "pyserving-run-"
_MODEL_SOCKET = "model.sock"  # model_process.MODEL_SOCKET (that module imports TensorFlow's protos)
_ABANDONED_S = 3600.0
_TENSOR_SWEEP_S = 30.0
_TENSOR_FILE_MAX_AGE_S = 300.0
_TENSOR_FILE_PREFIX = "t-"  # wire.TENSOR_FILE_PREFIX (wire imports numpy; this process stays lean)
_START_FAILED = 255  # a child's exit code when it could not start (it printed TF Serving's start-up error)


def die_with_parent() -> None:
    """A child is killed when the supervisor dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The supervisor died before prctl took effect: this process was handed to another parent. (Compared with
    # the supervisor's pid, not with 1: in a container the supervisor itself is pid 1.)
    if str(os.getppid()) != os.environ.get(PARENT_ENV, str(os.getppid())):
        os._exit(1)


def run(options: Options, argv: list[str], workers: int) -> int:
    """Serve with `workers` protocol workers until SIGTERM/SIGINT; the exit code."""
    shm = "/dev/shm"
    parent = shm if os.access(shm, os.W_OK) else tempfile.gettempdir()
    _sweep(parent)
    run_dir = tempfile.mkdtemp(prefix=_RUN_PREFIX, dir=parent)
    try:
        return _Supervisor(options, argv, workers, run_dir).run()
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def _sweep(parent: str) -> None:
    """Remove the run directories that killed supervisors left in `parent` (SIGKILL skips their cleanup;
    their children died with them). A directory is dead when nothing listens on its model socket any more
    (connect refused), or, without a socket (a model process killed while loading), when it is older than
    `_ABANDONED_S`. Pids are not used: a pod's containers share /dev/shm but not their pid namespaces."""
    try:
        entries = [entry for entry in os.scandir(parent) if entry.name.startswith(_RUN_PREFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
                continue
            path = os.path.join(entry.path, _MODEL_SOCKET)
            if os.path.exists(path):
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.settimeout(1.0)
                    probe.connect(path)  # answered: a live server's
                continue
            if time.time() - entry.stat().st_mtime < _ABANDONED_S:
                continue
        except (ConnectionRefusedError, FileNotFoundError):
            pass
        except OSError:  # anything else (a timeout: a busy server): leave it
            continue
        log.info("Removing %s, left by a server that was killed", entry.path)
        shutil.rmtree(entry.path, ignore_errors=True)


def _sweep_tensor_files(run_dir: str) -> None:
    """Remove tensor files nobody will read: a frame's file is unlinked by its reader within moments, but a
    call cancelled while its tensors were being written, or a frame dropped with a dead worker's
    connection, leaves its file (RAM, in /dev/shm) behind until the server stops."""
    cutoff = time.time() - _TENSOR_FILE_MAX_AGE_S
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(_TENSOR_FILE_PREFIX) and entry.stat().st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            continue


class _Supervisor:
    def __init__(self, options: Options, argv: list[str], workers: int, run_dir: str) -> None:
        self._options = options
        self._count = workers
        self._env = dict(os.environ, **{ARGV_ENV: json.dumps(argv), DIR_ENV: run_dir, PARENT_ENV: str(os.getpid())})
        self._signals: list[int] = []
        self._workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self._started: list[float] = [0.0] * workers
        self._run_dir = run_dir
        self._next_sweep = time.monotonic() + _TENSOR_SWEEP_S

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        model = self._start_model()
        if isinstance(model, int):
            return model
        log.info("Starting %d protocol workers (model process pid %d)", self._count, model.pid)
        for index in range(self._count):
            self._start_worker(index)
        while True:
            while self._signals:
                signum = self._signals.pop(0)
                if signum == signal.SIGHUP:
                    model.send_signal(signal.SIGHUP)  # the model process reloads the config file
                    continue
                return self._shutdown(model, signum)
            code = model.poll()
            if code is not None:
                log.error("The model process (pid %d) exited with code %d; stopping the server", model.pid, code)
                self._kill_workers()
                return 1
            for index, proc in enumerate(self._workers):
                if proc is not None and proc.poll() is not None:
                    if proc.returncode == _START_FAILED:  # it said why (a port taken, bad TLS files...)
                        log.error("Worker %d (pid %d) could not start; stopping the server", index, proc.pid)
                        self._kill_workers()
                        self._stop_model(model)
                        return _START_FAILED
                    log.error("Worker %d (pid %d) exited with code %d; restarting it", index, proc.pid, proc.returncode)
                    self._workers[index] = None
                if self._workers[index] is None and time.monotonic() - self._started[index] >= _RESTART_BACKOFF_S:
                    self._start_worker(index)
            if time.monotonic() >= self._next_sweep:
                self._next_sweep = time.monotonic() + _TENSOR_SWEEP_S
                _sweep_tensor_files(self._run_dir)
            time.sleep(_POLL_S)

    def _start_model(self) -> subprocess.Popen[bytes] | int:
        """The model process once every initial model loaded, or the exit code (it failed, or a signal came)."""
        read_end, write_end = os.pipe()
        env = dict(self._env, **{READY_FD_ENV: str(write_end)})
        model = subprocess.Popen(
            [sys.executable, "-m", "pyserving.workers", "model"], env=env, pass_fds=(write_end,), start_new_session=True
        )
        os.close(write_end)
        try:
            while True:
                if (stop := self._shutdown_signal()) is not None:
                    model.kill()
                    model.wait()
                    return 128 + stop
                ready, _, _ = select.select([read_end], [], [], _POLL_S)
                if ready:
                    if os.read(read_end, 1) == b"R":
                        return model
                    return model.wait()  # it failed to start (and said why)
        finally:
            os.close(read_end)

    def _start_worker(self, index: int) -> None:
        self._started[index] = time.monotonic()
        self._workers[index] = subprocess.Popen(
            [sys.executable, "-m", "pyserving.workers", "worker", str(index)], env=self._env, start_new_session=True
        )

    def _shutdown(self, model: subprocess.Popen[bytes], signum: int) -> int:
        """Drain every worker (each as a single process drains), then stop the model process."""
        log.info("Received signal %d: draining the protocol workers", signum)
        workers = [proc for proc in self._workers if proc is not None and proc.poll() is None]
        for proc in workers:
            proc.send_signal(signal.SIGTERM)
        budget = max(self._options.shutdown_delay_seconds, 0) + max(self._options.shutdown_grace_period_seconds, 0)
        deadline = time.monotonic() + budget + 30
        while any(proc.poll() is None for proc in workers):
            if (stop := self._shutdown_signal()) is not None:
                log.warning("Second shutdown signal: exiting without waiting for in-flight requests")
                self._kill_workers()
                model.kill()
                return 128 + stop
            if time.monotonic() > deadline:
                log.error("Workers still running %d s after SIGTERM: killing them", budget + 30)
                self._kill_workers()
                break
            time.sleep(_POLL_S)
        self._stop_model(model)
        log.info("Server stopped")
        return 0

    def _shutdown_signal(self) -> int | None:
        """The first shutdown signal received, if any (SIGHUP, a reload, is not one, wherever it sits)."""
        return next((sig for sig in self._signals if sig != signal.SIGHUP), None)

    def _stop_model(self, model: subprocess.Popen[bytes]) -> None:
        model.send_signal(signal.SIGTERM)
        try:
            model.wait(_MODEL_STOP_S)
        except subprocess.TimeoutExpired:
            log.error("The model process did not stop in %d s: killing it", _MODEL_STOP_S)
            model.kill()
            model.wait()

    def _kill_workers(self) -> None:
        for proc in self._workers:
            if proc is not None and proc.poll() is None:
                proc.kill()
        for proc in self._workers:
            if proc is not None:
                proc.wait()
