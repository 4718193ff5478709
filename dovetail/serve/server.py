"""``python launch.py serve``: start Ray (or join one) and Serve, run the app, stop cleanly."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from dovetail.serve.config import ServeConfig

CONTROL_LOOP_INTERVAL_S = 1.0


# Serve's router picks the replica with the shorter queue from lengths it caches for 10 s, so a
# burst of requests can all go to one replica while another idles. 0: ask the replicas each time
# (an actor call per request, about a millisecond, against steps of tens of milliseconds).
FRESH_QUEUE_LENGTHS = ("RAY_SERVE_QUEUE_LENGTH_CACHE_TIMEOUT_S", "0")


def run_server(config: ServeConfig, say=lambda msg: print(f"[dovetail] {msg}", file=sys.stderr, flush=True)) -> int:
    import ray
    from ray import serve

    from dovetail.actors.system import resolve_topology, start_ray
    from dovetail.protocol.shm import segment_names
    from dovetail.serve.app import build_app

    from dovetail.store import resolve_draft, resolve_model

    # refuse bad models and impossible splits here, with one line, before any replica starts
    engine = config.engine
    resolve_model(engine.target)
    if engine.draft:
        resolve_draft(engine.draft, engine.target)
    topology = resolve_topology(engine.sockets)
    for part in range(config.replica_slots):
        topology.partition(part, config.replica_slots)
    segments_before = segment_names()
    # Serve's controller wakes every 0.1 s by default; on a small machine that noise preempts the
    # shards' tightly synchronised GEMM threads (bench/results/serve.json measures the gain).
    # Only a Ray started here inherits it; a joined cluster keeps its own setting.
    os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", str(CONTROL_LOOP_INTERVAL_S))
    os.environ.setdefault(*FRESH_QUEUE_LENGTHS)
    owns_ray = start_ray(engine.address, topology)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        t0 = time.perf_counter()
        say(f"starting {config.replicas if not config.autoscaling else config.autoscaling.model_dump()} "
            f"replica(s) of {config.model_name} (loading models...)")
        serve.run(build_app(config.to_args()), name="dovetail", route_prefix="/")
        say(f"ready in {time.perf_counter() - t0:.1f}s: http://{config.host}:{config.port}/v1 "
            f"(model {config.model_name!r}; /metrics, /health); Ctrl-C stops")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        say("stopping")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        try:
            serve.shutdown()
        except Exception as exc:
            say(f"serve did not shut down cleanly: {exc}")
        if owns_ray:
            ray.shutdown()
        _sweep_segments(segments_before)
    return 0


def _sweep_segments(preexisting: set[str], timeout_s: float = 10.0) -> None:
    """Remove the shared memory of this server's workers once their processes have exited (Ray
    stops them asynchronously); segments that existed before the server started are not waited for."""
    from dovetail.protocol.shm import remove_orphaned_segments, segment_names

    deadline = time.monotonic() + timeout_s
    while True:
        remove_orphaned_segments()
        left = segment_names() - preexisting
        if not left or time.monotonic() > deadline:
            return
        time.sleep(0.5)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C


class ServerProcess:
    """``launch.py serve ARGS`` in a child process (benchmarks, tests): ``with`` waits until
    ``/health`` answers and stops it with SIGTERM on exit. ``url`` is the base URL. ``command``
    runs something else that serves on ``port`` (e.g. ``serve run deploy/serve.yaml``)."""

    def __init__(self, args: list[str], log_path, port: int | None = None, env: dict | None = None,
                 timeout_s: float = 900, command: list[str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path, self.timeout_s = Path(log_path), timeout_s
        self.cmd = command or [sys.executable, str(Path(__file__).resolve().parents[2] / "launch.py"), "serve",
                               "--port", str(self.port), *args]
        self.env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        import subprocess

        import httpx

        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start; its log ends:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, timeout_s: float = 90) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status (None: had to kill)."""
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
