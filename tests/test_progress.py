"""The progress line: phases, totals (estimated until every shard is read), rate and ETA; Ray's native log lines
filtered from stderr. No Ray: the board's snapshot is given as a dict."""

import io
import os
import subprocess
import sys
import time

from diffedit.pipelines.progress import NATIVE_LOG_LINE, ProgressLine


def test_phase_before_the_first_rows_then_estimated_then_exact_totals():
    line = ProgressLine(actors=2, stream=io.StringIO(), tty=False)
    line.phase = "loading the model"
    board = dict(shards=4, shards_read=0, samples_read=0, actors_ready=1, actor_notes=["model loaded on cpu in 3 s"])
    text = line.text(board)
    assert "editing the first batch (1/2 actor(s) ready" in text and "model loaded on cpu" in text and "ETA" not in text
    assert "loading the model (0/2 actor(s) ready)" in line.text(dict(board, actors_ready=0, actor_notes=[]))

    line.phase = "editing"
    line._recent.clear()
    line._recent.append((time.time() - 10, 0))  # 10 s ago, nothing was done
    line.samples_done, line.rows_done, line.ok = 20, 40, 38
    text = line.text(dict(board, shards_read=1, samples_read=25))
    assert "samples 20/~100" in text and "rows 40 (38 ok)" in text and "shards read 1/4" in text
    assert "samples/s" in text and "ETA 0m40s" in text  # 20 done in 10 s; 80 left at 2/s
    text = line.text(dict(board, shards_read=4, samples_read=90))
    assert "samples 20/90," in text  # every shard read: the total is exact


def test_a_limit_caps_the_total():
    line = ProgressLine(limit=10, stream=io.StringIO(), tty=False)
    line.phase = "editing"
    assert "samples 0/10" in line.text(dict(shards=2, shards_read=1, samples_read=50, actors_ready=1, actor_notes=[]))


def test_native_ray_log_lines_are_recognised_and_others_are_not():
    assert NATIVE_LOG_LINE.match(b"[2026-12-02 15:24:58,812 E 4228 4228] core_worker.cc:2465: Actor with class name")
    assert NATIVE_LOG_LINE.match(b"[2026-12-02 15:25:11,988 I 4838 4838] logging.cc:303: Set ray log level")
    assert not NATIVE_LOG_LINE.match(b"[0m15s] editing: samples 3/8")
    assert not NATIVE_LOG_LINE.match(b"diffedit run: error: No shard at 'x.tar'.")


def test_quiet_ray_filters_fd_2_and_lets_the_rest_through(tmp_path):
    script = (
        "import os, sys\n"
        "from diffedit.pipelines.progress import quiet_ray\n"
        "with quiet_ray():\n"
        "    os.write(2, b'[2026-12-02 15:24:58,812 E 1 1] core_worker.cc:1: noise\\n')\n"
        "    print('kept line', file=sys.stderr, flush=True)\n"
        "print('after', file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr
    assert "noise" not in proc.stderr and "kept line" in proc.stderr and "after" in proc.stderr
