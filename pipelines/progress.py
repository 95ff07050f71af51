"""Live progress of a job: what the workers report, and the line the driver keeps up to date.

Workers report to a ``ProgressBoard`` (a small Ray actor, no CPU reserved): each read task once per shard
(samples read), each edit actor when it has loaded its model. The driver counts the rows it commits.
``ProgressLine`` prints, every few seconds from a thread of its own, the phase (starting Ray, loading the
model, editing the first batch, editing), rows done, rate and ETA. On a terminal it rewrites one line in
place; in a log it prints a line every ``interval`` seconds.

The total is known once every shard is read (until then it is estimated from the shards read so far, and
marked ``~``), so the ETA is the time left at the rate of the last minute.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
import warnings
from collections import deque


class ProgressBoard:
    """Ray actor: counters the workers add to and the driver reads."""

    def __init__(self, shards: int):
        self.shards, self.shards_read, self.samples_read = shards, 0, 0
        self.actors_ready, self.actor_notes = 0, []

    def shard_read(self, samples: int) -> None:
        self.shards_read += 1
        self.samples_read += samples

    def actor_ready(self, note: str) -> None:
        self.actors_ready += 1
        self.actor_notes.append(note)

    def snapshot(self) -> dict:
        return dict(shards=self.shards, shards_read=self.shards_read, samples_read=self.samples_read,
                    actors_ready=self.actors_ready, actor_notes=self.actor_notes[-3:])


def report(board, method: str, *args) -> None:
    """Fire and forget: a worker never waits for, or fails because of, the progress board."""
    if board is None:
        return
    try:
        getattr(board, method).remote(*args)
    except Exception:  # noqa: BLE001 - progress is best effort
        pass


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressLine:
    """The driver's progress display (a daemon thread). ``phase`` and ``samples_done`` are set by the driver."""

    def __init__(self, board=None, actors: int = 1, limit: int | None = None, stream=None, interval: float | None = None,
                 tty: bool | None = None):
        self.board, self.actors, self.limit = board, actors, limit
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval if interval is not None else (1.0 if self.tty else 15.0)
        self.phase, self.samples_done, self.rows_done, self.ok = "starting", 0, 0, 0
        self.t0 = time.time()
        self._recent: deque = deque(maxlen=120)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.print_line()
            except Exception:  # noqa: BLE001 - a display error never stops the job
                pass

    def _board(self) -> dict:
        if self.board is None:
            return {}
        import ray

        return ray.get(self.board.snapshot.remote(), timeout=2)

    def text(self, board: dict) -> str:
        now = time.time()
        phase = self.phase
        if phase.startswith("loading") and board.get("actors_ready"):  # a model is up: its first batch is running
            phase = "editing the first batch" + (" (compiling)" if "compiling" in phase else "")
        parts = [f"diffedit {_duration(now - self.t0)}: {phase}"]
        if self.phase != "editing" and board:
            parts[0] += f" ({board.get('actors_ready', 0)}/{self.actors} actor(s) ready"
            parts[0] += f"; {board['actor_notes'][-1]})" if board.get("actor_notes") else ")"
        total, exact = self._total(board)
        done = f"{self.samples_done}" + (f"/{'' if exact else '~'}{total}" if total else "")
        parts.append(f"samples {done}, rows {self.rows_done} ({self.ok} ok)")
        if board:
            parts.append(f"shards read {board['shards_read']}/{board['shards']}")
        self._recent.append((now, self.samples_done))
        t_then, n_then = self._recent[0]
        rate = (self.samples_done - n_then) / (now - t_then) if now - t_then > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.2f} samples/s")
            if total:
                parts.append(f"ETA {_duration(max(total - self.samples_done, 0) / rate)}")
        return ", ".join(parts)

    def _total(self, board: dict) -> tuple[int | None, bool]:
        if not board or not board["shards_read"]:
            return self.limit, self.limit is not None
        exact = board["shards_read"] == board["shards"]
        total = board["samples_read"] if exact else round(board["samples_read"] * board["shards"] / board["shards_read"])
        if self.limit is not None and self.limit <= total:
            return self.limit, True
        return total, exact

    def print_line(self) -> None:
        line = self.text(self._board())
        if self.tty:
            self.stream.write("\r\x1b[2K" + line[:200])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# Ray's C++ core worker in the driver logs to file descriptor 2 directly (glog format), e.g. an error-level line
# about actor constructor arguments on every run: Python's logging cannot reach it.
NATIVE_LOG_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d [\d:,.]+ [DIWEF] \d+ \d+\] \S+\.(cc|h):\d+:")


@contextlib.contextmanager
def quiet_ray(verbose: bool = False):
    """Hide Ray's own log lines from the terminal unless ``verbose``: its Python loggers are set to critical only
    (a failure reaches the user as diffedit's own one-line error, pipelines/cli.py), the errors the raylet
    publishes to the driver (e.g. a dead actor's whole traceback, printed to stdout) are not printed, and the native
    lines on file descriptor 2 are filtered out (every other line written to stderr passes)."""
    if verbose:
        yield
        return
    import ray
    import ray.data  # noqa: F401 - its loggers are configured on import: quiet them after
    from ray._private import worker as ray_worker  # Ray prints published worker logs and errors if this is set

    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    ray_worker._worker_logs_enabled = False
    warnings.filterwarnings("ignore", module=r"ray(\.|$)")  # e.g. its UserWarning about actor pools with no input
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():
        with os.fdopen(read_end, "rb") as pipe:
            for line in pipe:
                if not NATIVE_LOG_LINE.match(line):
                    os.write(saved, line)
        os.close(saved)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    try:
        yield
    finally:
        ray_worker._worker_logs_enabled = True
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end held by fd 2: the thread reads to the end
        thread.join(timeout=0.5)  # Ray's own processes may hold the pipe open: do not wait for them

