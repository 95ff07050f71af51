"""Writing, reading and resuming a manifest folder (see ``schema.py`` for the layout).

Exactly once: rows are committed in parts, each written under a temporary name and renamed into place
(an atomic rename on one filesystem). The committed set is the union of the parts' ``edit_id``s; a rerun
skips those and recomputes the rest, and leftover temporary files of a killed run are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from .schema import SCHEMA, SCHEMA_VERSION, to_table

# Parameters that change the content of rows: a rerun with other values would mix two jobs in one manifest.
# (The schema version is checked before these, with a message of its own.)
IDENTITY_KEYS = ("edit", "seed", "model_fingerprint", "image_format", "prompts", "caption_field", "save_latents",
                 "resolution", "scores", "samples_per_edit", "best_by")


class ParameterMismatch(RuntimeError):
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

    # -- run.json --------------------------------------------------------------------------------
    def read_run(self) -> dict | None:
        return json.loads(self.run_json.read_text()) if self.run_json.is_file() else None

    def begin(self, run: dict, overwrite: bool = False) -> None:
        """Start or resume a job; refuse changed parameters on an existing OUT unless ``overwrite``."""
        previous = self.read_run()
        if previous is not None and overwrite:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.run_json.unlink()
            previous = None
        if previous is not None and previous.get("schema_version") != run.get("schema_version"):
            raise ParameterMismatch(
                f"{self.out} holds a manifest of schema version {previous.get('schema_version')}, written by another "
                f"version of diffedit; this one writes version {run.get('schema_version')} and cannot add to it. Its "
                "rows stay readable with pandas; use another --output, or pass --overwrite to delete it and start again."
            )
        if previous is not None:
            changed = [k for k in IDENTITY_KEYS if previous.get(k) != run.get(k)]
            if changed:
                detail = "; ".join(f"{k}: {previous.get(k)!r} -> {run.get(k)!r}" for k in changed)
                raise ParameterMismatch(
                    f"{self.out} holds a job with other parameters ({detail}). Rerun with the same parameters to "
                    "resume it, use another --output, or pass --overwrite to delete it and start again."
                )
        self.parts.mkdir(parents=True, exist_ok=True)
        for stale in self.parts.glob(".tmp-*"):
            stale.unlink()  # a part a killed run was writing: never committed, so recomputed
        self.write_run({**(previous or {}), **run, "completed": False})

    def write_run(self, run: dict) -> None:
        tmp = self.out / f".tmp-run-{uuid.uuid4().hex}.json"
        tmp.write_text(json.dumps(run, indent=1, sort_keys=True, default=str))
        os.replace(tmp, self.run_json)

    def finish(self, summary: dict) -> None:
        self.write_run({**(self.read_run() or {}), "completed": True, "last_summary": summary})

    # -- parts -----------------------------------------------------------------------------------
    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.parquet")) if self.parts.is_dir() else []

    def committed_ids(self) -> set[str]:
        ids: set[str] = set()
        for f in self.part_files():
            ids.update(pq.read_table(f, columns=["edit_id"]).column("edit_id").to_pylist())
        return ids

    def commit(self, rows: list[dict] | pa.Table) -> Path:
        table = rows if isinstance(rows, pa.Table) else to_table(rows)
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.parts / f".tmp-{name}.partial"  # hidden, and no .parquet suffix: no reader globs it
        pq.write_table(table.replace_schema_metadata(SCHEMA.metadata), tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.parts / name)
        return self.parts / name

    def read(self, columns: list[str] | None = None) -> pa.Table:
        files = self.part_files()
        if not files:
            return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
        return pads.dataset([str(f) for f in files], format="parquet", schema=SCHEMA).to_table(columns=columns)


def schema_version(part: str | Path) -> str:
    return pq.read_schema(part).metadata[b"diffedit.schema_version"].decode()


__all__ = ["OutputStore", "ParameterMismatch", "SCHEMA_VERSION", "schema_version"]
