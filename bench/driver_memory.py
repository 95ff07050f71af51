"""The job driver's memory and the bytes it receives from the Ray Data stream, on a CPU run of the tiny model.

    python bench/driver_memory.py [--samples 10000] [--per-shard 1000] [--work /tmp/driver_memory]
                                  [--result bench/results/driver_memory_cpu.json] [--code REPO] [-- RUN_ARGS...]

Runs `diffedit run` in this process, through the command line's own entry (diffedit.pipelines.cli.main, the
interface that stays put when the job's internals change), on --samples WebDataset samples written once into
--work (img2dataset's layout: key.jpg, key.txt caption, key.json; 256x256 JPEGs of a gradient and a coloured
disc, captions "a photo of a red disc" and so on: the default prompt rules make one edit per sample), with the
tiny random diffusers model (built once into --work), --device cpu --dtype fp32 --no-scores --steps 4
--mask-samples 2, batch size 8, output under --work (overwritten each run). Arguments after `--` go to
`diffedit run` as they are.

Measured in the driver (this process):
- RSS (VmRSS, with RssAnon/RssShmem) every --interval seconds from a background thread, and at each batch
  the driver receives; peak RSS (VmHWM); RSS at the start of streaming and at 25/50/75/100% of the rows;
  the least-squares slope of RSS against rows received after the first 10% of rows, in MiB per 1,000 rows;
- the bytes the driver receives: ray.data.Dataset.iter_batches is wrapped (whatever the job does with the
  batches) and each yielded batch's size summed (pyarrow: Table.nbytes, by column too), with its rows;
- wall time, and rows by status (the run's summary in OUT/run.json, else the manifest's status column).

Which code is measured: the `diffedit` that imports first (PYTHONPATH), or --code REPO (a repository root,
imported as `diffedit` through a symlink; the Ray workers get it through PYTHONPATH too). The result records
diffedit.__file__, the workers' diffedit.__file__ and the repository's commit. To measure a commit apart from a
working tree that others change:

    git -C REPO worktree add /tmp/before HEAD
    python bench/driver_memory.py --code /tmp/before --result bench/results/driver_memory_cpu_before.json
    git -C REPO worktree remove --force /tmp/before

The model and the samples are prepared in a child process, so that neither their imports (torch) nor their
memory count in the driver's peak.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20
COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (235, 210, 30)}
RUN_ARGS = ["--device", "cpu", "--dtype", "fp32", "--no-scores", "--steps", "4", "--mask-samples", "2"]


# -- the driver's memory -----------------------------------------------------------------------------------

def proc_status() -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of this process, in MiB (Linux /proc/self/status)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[name] = int(value.split()[0]) / 1024  # kB
    return out


class Recorder:
    """RSS over time (a background thread) and at each batch received, with the bytes and rows received."""

    def __init__(self, interval: float):
        self.interval = interval
        self.t0 = time.time()
        self.lock = threading.Lock()
        self.rows = 0
        self.bytes = 0
        self.batches = 0
        self.bytes_by_column: dict[str, int] = {}
        self.iter_calls = 0
        self.stream_start: dict | None = None  # RSS when the first iter_batches started
        self.first_batch_s: float | None = None
        self.over_time: list[tuple] = []  # (s, rows, rss, anon, shmem)
        self.per_batch: list[tuple] = []  # (s, rows, rss, anon, shmem) after each batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def point(self) -> tuple:
        m = proc_status()
        return (round(time.time() - self.t0, 3), self.rows, round(m["VmRSS"], 2), round(m.get("RssAnon", 0), 2),
                round(m.get("RssShmem", 0), 2))

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                self.over_time.append(self.point())

    def start(self) -> None:
        self.over_time.append(self.point())
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.over_time.append(self.point())

    def stream_started(self) -> None:
        with self.lock:
            self.iter_calls += 1
            if self.stream_start is None:
                self.stream_start = dict(s=round(time.time() - self.t0, 3), **proc_status())

    def batch(self, batch) -> None:
        nbytes, rows, columns = batch_size(batch)
        with self.lock:
            if self.first_batch_s is None:
                self.first_batch_s = round(time.time() - self.t0, 3)
            self.batches += 1
            self.rows += rows
            self.bytes += nbytes
            for name, n in columns.items():
                self.bytes_by_column[name] = self.bytes_by_column.get(name, 0) + n
            self.per_batch.append(self.point())


def batch_size(batch) -> tuple[int, int, dict]:
    """(bytes, rows, bytes by column) of a batch as Ray Data yields it: pyarrow, pandas or dict of arrays."""
    if hasattr(batch, "num_rows") and hasattr(batch, "nbytes"):  # pyarrow Table / RecordBatch
        return batch.nbytes, batch.num_rows, {n: batch.column(n).nbytes for n in batch.column_names}
    if hasattr(batch, "memory_usage"):  # pandas
        usage = batch.memory_usage(deep=True, index=False)
        return int(usage.sum()), len(batch), {str(k): int(v) for k, v in usage.items()}
    if isinstance(batch, dict):  # numpy format
        columns = {k: int(getattr(v, "nbytes", 0)) for k, v in batch.items()}
        rows = len(next(iter(batch.values()))) if batch else 0
        return sum(columns.values()), rows, columns
    return 0, len(batch), {}


def wrap_iter_batches(recorder: Recorder):
    """Wrap ray.data.Dataset.iter_batches so every batch it yields, to whatever called it, is counted."""
    from ray.data import Dataset

    original = Dataset.iter_batches

    def iter_batches(self, *args, **kwargs):
        recorder.stream_started()
        for batch in original(self, *args, **kwargs):
            recorder.batch(batch)
            yield batch

    iter_batches.__wrapped__ = original
    Dataset.iter_batches = iter_batches
    return lambda: setattr(Dataset, "iter_batches", original)


# -- numbers -------------------------------------------------------------------------------------------------

def slope_per_1k(points: list[tuple], skip_fraction: float = 0.1) -> float | None:
    """Least-squares slope of RSS (MiB) against rows received, per 1,000 rows, after the first rows."""
    if not points:
        return None
    total = points[-1][1]
    xs_ys = [(p[1], p[2]) for p in points if p[1] >= skip_fraction * total]
    if len(xs_ys) < 2:
        return None
    n = len(xs_ys)
    mx = sum(x for x, _ in xs_ys) / n
    my = sum(y for _, y in xs_ys) / n
    sxx = sum((x - mx) ** 2 for x, _ in xs_ys)
    if sxx == 0:
        return None
    return round(1000 * sum((x - mx) * (y - my) for x, y in xs_ys) / sxx, 3)


def rss_at_fractions(points: list[tuple]) -> dict:
    """RSS after the first batch that reaches 25/50/75/100% of the rows received."""
    if not points:
        return {}
    total = points[-1][1]
    out = {}
    for pct in (25, 50, 75, 100):
        hit = next(p for p in points if p[1] >= pct / 100 * total)
        out[f"{pct}%"] = dict(rows=hit[1], rss_mib=hit[2], rss_anon_mib=hit[3], rss_shmem_mib=hit[4], s=hit[0])
    return out


def thin(points: list[tuple], most: int = 400) -> list[list]:
    step = max(1, -(-len(points) // most))
    kept = points[::step]
    if points and kept[-1] is not points[-1]:
        kept.append(points[-1])
    return [list(p) for p in kept]


def rows_by_status(out: Path) -> tuple[dict, dict | None]:
    """(rows by status, the run's summary): OUT/run.json's last summary, else the manifest's status column."""
    summary = None
    try:
        summary = json.loads((out / "run.json").read_text()).get("last_summary")
    except (OSError, ValueError):
        pass
    if summary and summary.get("new_by_status") is not None:
        return dict(summary["new_by_status"]), summary
    import pyarrow.parquet as pq

    counts: dict = {}
    for part in sorted(out.rglob("*.parquet")):
        if "status" in pq.read_schema(part).names:
            for s in pq.read_table(part, columns=["status"]).column("status").to_pylist():
                counts[s] = counts.get(s, 0) + 1
    return counts, summary


def git_commit(repo: Path) -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    status = git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=git("rev-parse", "--short", "HEAD"), tracked_files_changed=None if status is None
                else len(status.splitlines()))


# -- preparation (child process) ---------------------------------------------------------------------------

def sample_image(i: int, colour: str, rng) -> bytes:
    """256x256 JPEG: a smooth two-way gradient and a coloured disc (place and size vary)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:256, 0:256].astype(np.float32) / 255
    base = rng.uniform(40, 200, 3)
    tilt = rng.uniform(-60, 60, (2, 3))
    img = base + x[..., None] * tilt[0] + y[..., None] * tilt[1]
    cx, cy = rng.uniform(70, 186, 2)
    r = rng.uniform(30, 60)
    disc = (x * 255 - cx) ** 2 + (y * 255 - cy) ** 2 <= r * r
    img[disc] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_samples(folder: Path, samples: int, per_shard: int) -> None:
    import numpy as np
    import webdataset as wds

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(0)
    colours = list(COLOURS)
    for s in range(-(-samples // per_shard)):
        with wds.TarWriter(str(tmp / f"{s:05d}.tar")) as sink:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                key = f"{i:09d}"
                colour = colours[i % len(colours)]
                caption = f"a photo of a {colour} disc"
                meta = dict(url=f"https://example.invalid/{key}.jpg", caption=caption, key=key, status="success",
                            error_message=None, width=256, height=256, original_width=256, original_height=256)
                sink.write({"__key__": key, "jpg": sample_image(i, colour, rng), "txt": caption,
                            "json": json.dumps(meta).encode()})
    tmp.rename(folder)


def prepare(args) -> None:
    from harness import model_folder

    model_folder("tiny", args.work)  # WORK/tiny, built once
    shards = args.work / f"samples-{args.samples}-{args.per_shard}"
    if not shards.is_dir():
        write_samples(shards, args.samples, args.per_shard)


# -- the run -------------------------------------------------------------------------------------------------

def use_code(repo: Path) -> None:
    """Import `diffedit` from the repository root ``repo`` (here and in Ray's workers): a symlink named diffedit."""
    parent = Path(tempfile.mkdtemp(prefix="driver_memory_code_"))
    (parent / "diffedit").symlink_to(repo.resolve(), target_is_directory=True)
    sys.path.insert(0, str(parent))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(parent)] + [p for p in [os.environ.get("PYTHONPATH")] if p])


def measure(args, run_args: list[str]) -> dict:
    import diffedit

    code = Path(diffedit.__file__).resolve().parent
    print(f"driver_memory: diffedit imported from {diffedit.__file__} (-> {code})", flush=True)
    model = args.work / "tiny"
    shards = sorted(str(p) for p in (args.work / f"samples-{args.samples}-{args.per_shard}").glob("*.tar"))
    out = args.work / "out"
    shutil.rmtree(out, ignore_errors=True)
    argv = ["run", *shards, "--output", str(out), "--model", str(model), *RUN_ARGS,
            "--batch-size", str(args.batch_size), "--overwrite", *run_args]

    recorder = Recorder(args.interval)
    import ray.data  # noqa: F401  (the driver imports it anyway; imported here to wrap iter_batches)

    unwrap = wrap_iter_batches(recorder)
    before_job = proc_status()
    recorder.start()
    t0 = time.time()
    try:
        from diffedit.pipelines.cli import main as cli_main

        rc = cli_main(argv)
    finally:
        seconds = time.time() - t0
        recorder.stop()
        unwrap()
    end = proc_status()
    if rc != 0:
        raise SystemExit(f"driver_memory: `diffedit run` exited with {rc}")

    workers_file = None
    import ray

    if ray.is_initialized():  # the job leaves its local Ray up: ask a worker which diffedit it imports
        workers_file = ray.get(ray.remote(num_cpus=0)(lambda: __import__("diffedit").__file__).remote())
        ray.shutdown()

    statuses, summary = rows_by_status(out)
    edits = recorder.rows
    ok = statuses.get("ok", 0)
    pb = recorder.per_batch
    start = recorder.stream_start or {}
    rss_start = start.get("VmRSS")
    rss_end = pb[-1][2] if pb else None
    return dict(
        n_samples=args.samples, per_shard=args.per_shard, batch_size=args.batch_size,
        run_argv=["diffedit", *argv[:1], f"<{len(shards)} shards>", *argv[1 + len(shards):]],
        diffedit_file=diffedit.__file__, diffedit_code=str(code), workers_diffedit_file=workers_file,
        **git_commit(code),
        seconds=round(seconds, 2), seconds_to_first_batch=recorder.first_batch_s,
        rows_received=recorder.rows, batches_received=recorder.batches, iter_batches_calls=recorder.iter_calls,
        rows_by_status=statuses, job_summary=summary,
        edits_per_s=round(ok / seconds, 2) if seconds else None,
        peak_rss_mib=round(end["VmHWM"], 1),
        rss_before_job_mib=round(before_job["VmRSS"], 1),
        rss_stream_start_mib=round(rss_start, 1) if rss_start else None,
        rss_at_rows=rss_at_fractions(pb),
        rss_end_mib=round(end["VmRSS"], 1),
        rss_growth_while_streaming_mib=round(rss_end - rss_start, 1) if pb and rss_start else None,
        rss_growth_per_1k_edits_mib=round(1000 * (rss_end - rss_start) / edits, 3) if pb and rss_start and edits
        else None,
        rss_slope_mib_per_1k_rows=slope_per_1k(pb),
        rss_anon_slope_mib_per_1k_rows=slope_per_1k([(p[0], p[1], p[3]) for p in pb]),
        bytes_received=recorder.bytes,
        bytes_received_per_1k_edits=round(1000 * recorder.bytes / edits) if edits else None,
        mib_received_per_1k_edits=round(1000 * recorder.bytes / edits / MIB, 2) if edits else None,
        bytes_received_by_column=dict(sorted(recorder.bytes_by_column.items(), key=lambda kv: -kv[1])),
        ok_rows=ok,
        rss_per_batch=dict(columns=["s", "rows", "rss_mib", "rss_anon_mib", "rss_shmem_mib"], points=thin(pb)),
        rss_over_time=dict(columns=["s", "rows", "rss_mib", "rss_anon_mib", "rss_shmem_mib"],
                           interval_s=args.interval, points=thin(recorder.over_time)),
        python=sys.version.split()[0], cpus=os.cpu_count(),
    )


def report(r: dict) -> str:
    at = r["rss_at_rows"]
    lines = [
        f"diffedit {r['diffedit_code']} @ {r['commit']}: {r['n_samples']} samples, {r['seconds']} s "
        f"({r['edits_per_s']} edits/s), rows {r['rows_by_status']}",
        f"driver peak RSS (VmHWM) {r['peak_rss_mib']} MiB; RSS before the job {r['rss_before_job_mib']} MiB, "
        f"at stream start {r['rss_stream_start_mib']} MiB, "
        + ", ".join(f"{k} {v['rss_mib']:.0f}" for k, v in at.items()) + " MiB",
        f"RSS growth while streaming {r['rss_growth_while_streaming_mib']} MiB = {r['rss_growth_per_1k_edits_mib']} "
        f"MiB per 1k edits; slope after 10% of rows {r['rss_slope_mib_per_1k_rows']} MiB per 1k rows "
        f"(anon {r['rss_anon_slope_mib_per_1k_rows']})",
        f"received {r['rows_received']} rows in {r['batches_received']} batches, {r['bytes_received'] / MIB:.1f} MiB "
        f"= {r['mib_received_per_1k_edits']} MiB per 1k edits; largest columns: "
        + ", ".join(f"{k} {v / MIB:.1f} MiB" for k, v in list(r["bytes_received_by_column"].items())[:3]),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    run_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=10_000, help="samples (one edit each) (default 10000)")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per WebDataset shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="`diffedit run --batch-size` (default 8)")
    p.add_argument("--work", type=Path, default=Path("/tmp/driver_memory"),
                   help="model, samples (kept and reused) and the job's output (default /tmp/driver_memory)")
    p.add_argument("--result", type=Path, default=Path(__file__).resolve().parent / "results" / "driver_memory_cpu.json",
                   help="JSON result (default bench/results/driver_memory_cpu.json)")
    p.add_argument("--code", type=Path, help="a repository root to import as `diffedit` (default: the installed one)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples (default 0.5)")
    p.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.work = args.work.resolve()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.pop("RAY_ADDRESS", None)  # a new local Ray, as a plain `diffedit run` on one machine
    if args.code:
        use_code(args.code)
    else:
        try:
            import diffedit  # noqa: F401
        except ModuleNotFoundError:  # not installed: the repository this script is in
            use_code(Path(__file__).resolve().parents[1])
    if args.prepare_only:
        prepare(args)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    child = [sys.executable, __file__, "--prepare-only", "--samples", str(args.samples), "--per-shard",
             str(args.per_shard), "--work", str(args.work)] + (["--code", str(args.code)] if args.code else [])
    subprocess.run(child, check=True)  # torch and the samples' memory stay out of this process
    result = measure(args, run_args)
    from harness import write_result  # after the measurement: the harness imports torch, which the driver does not

    write_result(args.result, "cpu", **result)
    print(report(result))
    print(f"driver_memory: wrote {args.result}")


if __name__ == "__main__":
    main()
