"""Writing, reading and resuming a manifest folder (see ``schema.py`` for the layout).

Exactly once: rows are committed in parts. A worker writes a part whole under a staging name
(``manifest/.staged-*.parquet``, hidden from readers: :meth:`OutputStore.stage`) and the job's driver commits it
by renaming it into place (``part-*.parquet``: an atomic rename on one filesystem, :meth:`commit_staged`), so no
row's bytes pass through the driver. The committed set is the union of the parts' ``edit_id``s; a rerun skips
those and recomputes the rest. Staged parts that were never committed (a killed run, a retried task) are removed
when a run begins and when it ends. On a cluster the output folder is a shared filesystem that every node mounts
at the same path.

One job at a time: ``begin`` takes an exclusive ``flock`` on ``OUT/.lock`` and holds it until ``close``;
the kernel releases it when the process ends, however it ends, so a killed job never leaves it stuck.

Retrying errors: ``begin(retry=shards)`` un-commits every edit of those shards that has an ``error`` row (the
job passes the shards it is about to read: errors of shards it will not read stay), by rewriting each part
that holds one without that edit's rows (written aside, then renamed over the part: atomic). Those
edits are then no longer committed, so the job computes them again; a kill in between only means they are
computed by the next run instead.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .schema import SCHEMA, SCHEMA_VERSION, to_table

STAGED = ".staged-"  # the prefix of parts written but not committed (a leading dot: readers skip them)


class ParameterMismatch(RuntimeError):
    pass


class OutputLocked(RuntimeError):
    pass


class OutputStore:
    def __init__(self, out: str | Path):
        if "://" in str(out):
            raise ValueError(
                f"--output {out} is a URL; the manifest needs a local or mounted folder (atomic renames). "
                "Write to a shared mount and copy it to object storage afterwards."
            )
        self.out = Path(out)
        self.parts = self.out / "manifest"
        self.run_json = self.out / "run.json"
        self._lock = None

    # -- run.json --------------------------------------------------------------------------------
    def read_run(self) -> dict | None:
        if not self.run_json.is_file():
            return None
        try:
            run = json.loads(self.run_json.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.run_json} is not valid JSON ({exc}); pass --overwrite to delete this job "
                             "and start again, or repair the file") from exc
        if not isinstance(run, dict):
            raise ValueError(f"{self.run_json} does not hold a diffedit run record; pass --overwrite to start again")
        return run

    def lock(self) -> None:
        """Take ``OUT/.lock`` for this process, or raise OutputLocked naming the job that holds it."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--output {self.out} exists and is not a folder")
        self.out.mkdir(parents=True, exist_ok=True)
        f = open(self.out / ".lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise OutputLocked(f"{self.out} is in use by another diffedit job ({holder}); wait for it to end or use "
                               "another --output") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        self._lock = f

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def begin(self, run: dict, overwrite: bool = False, retry: frozenset[str] = frozenset()) -> int:
        """Start or resume a job; refuse changed parameters on an existing OUT that holds committed rows unless
        ``overwrite`` (a job that committed nothing, say one refused at its start, takes new parameters). Takes the
        lock. Un-commits the failed edits of the shards in ``retry``; returns how many."""
        if self._lock is None:
            self.lock()
        if overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.run_json.unlink(missing_ok=True)
        previous = self.read_run()
        if previous is None and self.part_files():
            raise ParameterMismatch(
                f"{self.parts} holds {len(self.part_files())} committed part(s) but {self.run_json} is missing, so "
                "their parameters cannot be checked; pass --overwrite to delete them and start again, or use another "
                "--output")
        if previous is not None and self.part_files():
            check_same_job(self.out, previous, run)
        self.parts.mkdir(parents=True, exist_ok=True)
        self._remove_uncommitted()
        retried = self.uncommit_errors(retry) if retry else 0
        self.write_run({**(previous or {}), **run, "completed": False})
        return retried

    def write_run(self, run: dict) -> None:
        tmp = self.out / f".tmp-run-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.run_json)

    def finish(self, summary: dict) -> None:
        self._remove_uncommitted()
        self.write_run({**(self.read_run() or {}), "completed": True, "last_summary": summary})

    def _remove_uncommitted(self) -> None:
        """Remove parts written but never committed: of a killed run, or of a task that Ray ran again."""
        for stale in [*self.parts.glob(".tmp-*"), *self.parts.glob(STAGED + "*")]:
            stale.unlink(missing_ok=True)

    # -- parts -----------------------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for f in self.part_files():
            ids.update(pq.read_table(f, columns=["edit_id"]).column("edit_id").to_pylist())
        return ids

    def check_staging(self) -> None:
        """Raise unless this process sees the job's manifest folder (a worker on another node of a cluster)."""
        if not self.parts.is_dir():
            raise RuntimeError(f"{self.parts} does not exist on {socket.gethostname()}: on a cluster, --output must be "
                               "a shared folder that every node mounts at the same path")

    def stage(self, rows: list[dict] | pa.Table, writer: str | None = None) -> str:
        """Write rows as one part under a staging name (workers); returns the name for :meth:`commit_staged`.
        ``writer`` (who wrote it: a node and process) goes in the part's metadata (``diffedit.writer``)."""
        table = rows if isinstance(rows, pa.Table) else to_table(rows)
        name = f"{STAGED}{uuid.uuid4().hex}.parquet"
        metadata = {**SCHEMA.metadata, b"diffedit.writer": (writer or f"pid {os.getpid()}").encode()}
        _write_durably(table.replace_schema_metadata(metadata), self.parts / name)
        return name

    def commit_staged(self, name: str) -> Path:
        """Commit a staged part: rename it into place (the driver)."""
        if not name.startswith(STAGED) or "/" in name:
            raise ValueError(f"not a staged part name: {name!r}")
        part = self.parts / ("part-" + name[len(STAGED):])
        os.replace(self.parts / name, part)
        return part

    def commit(self, rows: list[dict] | pa.Table) -> Path:
        return self.commit_staged(self.stage(rows))

    def failed_samples(self) -> set[tuple[str, str]]:
        """(shard, key) of every sample that has an error row."""
        table = self.read(columns=["shard", "key", "status"])
        return {(r["shard"], r["key"]) for r in table.to_pylist() if r["status"] == "error"}

    def uncommit_errors(self, shards: frozenset[str]) -> int:
        """Remove every edit of ``shards`` (all rows of its shard, key and edit index) that has an error row;
        returns how many."""
        removed = 0
        for f in self.part_files():
            rows = pq.read_table(f, columns=["shard", "key", "edit_index", "status"]).to_pylist()
            failed = {(r["shard"], r["key"], r["edit_index"]) for r in rows
                      if r["status"] == "error" and r["shard"] in shards}
            if not failed:
                continue  # the part's images are read only when it has rows to drop
            keep = [(r["shard"], r["key"], r["edit_index"]) not in failed for r in rows]
            removed += len(failed)
            self._replace_part(f, pq.read_table(f).filter(pa.array(keep)))
        return removed

    def _replace_part(self, part: Path, table: pa.Table) -> None:
        if table.num_rows == 0:
            part.unlink()
            return
        tmp = self.parts / f".tmp-{part.name}.partial"  # hidden, and no .parquet suffix: no reader globs it
        _write_durably(table.replace_schema_metadata(pq.read_schema(part).metadata), tmp)
        os.replace(tmp, part)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        files = self.part_files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pads.dataset([str(f) for f in files], format="parquet", schema=SCHEMA).to_table(columns=columns)


def _write_durably(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def check_same_job(out: Path, previous: dict, run: dict) -> None:
    """Refuse to add rows of other parameters (or another schema version) to the job in ``out``."""
    if previous.get("schema_version") != run.get("schema_version"):
        raise ParameterMismatch(
            f"{out} holds a manifest of schema version {previous.get('schema_version')}, written by another "
            f"version of diffedit; this one writes version {run.get('schema_version')} and cannot add to it. Its "
            "rows stay readable with pandas; use another --output, or pass --overwrite to delete it and start again."
        )
    if "identity" not in previous and "identity" in run:
        raise ParameterMismatch(f"{out} holds a job recorded by an older version of diffedit, whose parameters this "
                                "one cannot compare; use another --output, or pass --overwrite to start again.")
    before, after = previous.get("identity") or {}, run.get("identity") or {}
    # A key the earlier record lacks (added to the identity since) counts at the value such a job ran at.
    before = {**{k: v for k, v in (run.get("identity_defaults") or {}).items() if k in after}, **before}
    changed = [k for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    if changed:
        detail = "; ".join(f"{k}: {_short(before.get(k))} -> {_short(after.get(k))}" for k in changed)
        raise ParameterMismatch(
            f"{out} holds a job with other parameters ({detail}). Rerun with the same parameters to "
            "resume it, use another --output, or pass --overwrite to delete it and start again."
        )


def _short(value) -> str:
    """A value for the refusal message: numbers as they are, strings quoted, long ones cut."""
    text = str(value) if isinstance(value, (int, float, bool)) or value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def schema_version(part: str | Path) -> str:
    return pq.read_schema(part).metadata[b"diffedit.schema_version"].decode()


__all__ = ["OutputLocked", "OutputStore", "ParameterMismatch", "SCHEMA_VERSION", "schema_version"]
