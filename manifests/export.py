"""`diffedit status` and `diffedit export`: reading a manifest folder back.

Export writes the kept edits as WebDataset shards for a training loader, one sample per edit:
``__key__`` = the edit_id (safe as a name; the original key is in the json), ``png``/``jpg`` = the edit,
``mask.png``, ``txt`` = the target prompt, ``json`` = key, prompts, seed, sample index, best, scores.
With best-of-k (``--samples-per-edit k``) every ok sample is exported unless ``best_only``. ``--where`` is the
filter language of ``filter.py`` (never pandas' ``query``). Beside the shards, ``export.json`` records the export.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from .filter import Expr, FilterError, parse
from .schema import SCHEMA, SCHEMA_VERSION, SCORE_COLUMNS, missing
from .store import OutputStore

MEASURES = ("mask_fraction", *SCORE_COLUMNS)  # the numbers `status` summarises
EXPORT_COLUMNS = ("key", "edit_id", "shard", "source_prompt", "target_prompt", "seed", "sample_index", "best", "width",
                  "height", *MEASURES, "mask_png", "edited_png", "edited_jpg")
EXPORT_MARKER = "export.json"  # what was exported, from where, with which filter; written last
SHARD_NAME = re.compile(r"edits-[0-9]+\.tar")


def status(out: str | Path) -> dict:
    store = OutputStore(out)
    run = store.read_run()
    if run is None:
        raise FileNotFoundError(f"{out} holds no diffedit job (no run.json).")
    table = store.read(columns=["shard", "key", "edit_index", "sample_index", "best", "status", "error", *MEASURES])
    df = table.to_pandas()
    errors = Counter(str(e).split(":")[0][:80] for e in df.loc[df.status == "error", "error"])
    scores = {}
    for col in MEASURES:
        values = df.loc[df.status == "ok", col].dropna()
        if len(values):
            q = values.quantile([0.1, 0.5, 0.9])
            scores[col] = dict(mean=float(values.mean()), p10=float(q[0.1]), p50=float(q[0.5]), p90=float(q[0.9]))
    return dict(
        output=str(Path(out).resolve()),
        rows=len(df),
        by_status=dict(Counter(df.status)),
        completed=bool(run.get("completed")),
        left=_left(run, int((df.status == "error").sum())),
        top_errors=dict(errors.most_common(5)),
        scores=scores,
        best_of_k=_best_of_k(df, run),
    )


def _left(run: dict, errors: int) -> str:
    retry = (f"; {errors} error row(s), which rerunning the same `diffedit run` command retries (unless "
             "--no-retry-errors)") if errors else ""
    if run.get("completed"):
        return "nothing: the last run completed" + retry
    return "the last run did not complete: rerun the same `diffedit run` command to finish it" + retry


def _best_of_k(df: pd.DataFrame, run: dict) -> dict:
    """Edits (groups of k samples), how many have a best row, and how many chose it without the score."""
    edits = df[df.sample_index.notna()]
    ok = edits[edits.status == "ok"]
    sampling = run.get("sampling") or {}
    by = sampling.get("best_by")
    out = dict(samples_per_edit=sampling.get("samples_per_edit", 1), best_by=by,
               edits=int(edits.groupby(["shard", "key", "edit_index"]).ngroups),
               edits_with_an_ok_sample=int(ok.groupby(["shard", "key", "edit_index"]).ngroups),
               best_rows=int((df.best == True).sum()))  # noqa: E712 (best may hold nulls: old or foreign rows)
    if by in df:  # as manifests.best.mark_best counts them: several ok samples, none with the score
        n = ok.groupby(["shard", "key", "edit_index"])[by].agg(["size", "count"])
        out["edits_best_without_score"] = int(((n["size"] > 1) & (n["count"] == 0)).sum())
    return out


def export(out: str | Path, to: str | Path, where: str | None = None, best_only: bool = False,
           maxcount: int = 10000, overwrite: bool = False) -> dict:
    """Write ``ok`` rows (only the best sample of each edit with ``best_only``; only those where the filter
    ``where`` is true, see ``manifests/filter.py``) as WebDataset shards ``edits-NNNNNN.tar`` under ``to``.

    ``to`` must be new or empty; ``overwrite`` replaces a previous export there, and refuses a folder holding
    anything else. The shards are written into a temporary folder beside ``to`` and moved into place at the
    end, so ``to`` holds either the whole export or what it held before.
    """
    # 1. Check the job, the filter and the destination before reading or writing anything.
    store = _job_store(out)
    expr = _parse_where(where)
    to = Path(to).resolve()
    _check_destination(to, overwrite)

    # 2. The rows, read with pyarrow: integers stay exact int64 (pandas would make a nullable seed a float64).
    table = _rows_to_export(store, expr, best_only)

    # 3. Write the shards and the marker into a temporary folder beside `to`, then move it into place.
    tmp = _fresh_temporary_folder(to)
    try:
        shards = _write_shards(table, tmp, maxcount)
        result = dict(exported=table.num_rows, to=str(to), where=where, best_only=best_only)
        marker = dict(result, source=str(Path(out).resolve()), shards=shards, schema_version=SCHEMA_VERSION)
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _job_store(out: str | Path) -> OutputStore:
    """The job's output store; raises unless ``out`` holds a job (a run.json or manifest parts)."""
    store = OutputStore(out)
    if store.read_run() is None and not store.part_files():
        raise FileNotFoundError(f"{out} holds no diffedit job (no run.json and no manifest/part-*.parquet): "
                                "nothing to export.")
    return store


def _parse_where(where: str | None) -> Expr | None:
    """The parsed ``--where`` filter over the manifest's columns, or None without one."""
    if where is None:  # "" is parsed too: an empty variable in a script must not export everything silently
        return None
    try:
        return parse(where, SCHEMA)
    except FilterError as exc:
        raise FilterError(f"--where is not a valid filter over the manifest's columns: {exc}") from exc


def _rows_to_export(store: OutputStore, expr: Expr | None, best_only: bool) -> pa.Table:
    """The ``ok`` rows (the best of each edit with ``best_only``) where ``expr`` holds, with the columns needed."""
    columns = {"status", *EXPORT_COLUMNS, *(expr.columns if expr else ())}
    table = store.read(columns=[c for c in SCHEMA.names if c in columns])
    table = table.filter(pc.equal(table["status"], "ok"))
    if best_only:
        if table.num_rows and table["best"].null_count == table.num_rows:
            raise ValueError("--best-only: these rows have no `best` mark (a manifest older than schema version 2).")
        table = table.filter(pc.equal(table["best"], True))
    if expr is not None:
        table = table.filter(pa.array(expr.mask(table).to_numpy()))
    return table


def _fresh_temporary_folder(to: Path) -> Path:
    """A new, empty folder beside ``to`` to write the export into, after removing any a killed export left."""
    to.parent.mkdir(parents=True, exist_ok=True)
    for stale in to.parent.glob(f".{glob.escape(to.name)}.export-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = to.parent / f".{to.name}.export-{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    return tmp


def _is_export_file(path: Path) -> bool:
    """A file a previous export wrote (a shard or the marker): the only files ``overwrite`` removes."""
    return path.is_file() and (path.name == EXPORT_MARKER or SHARD_NAME.fullmatch(path.name) is not None)


def _check_destination(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise ValueError(f"--to {to} is a file, not a folder.")
    entries = sorted(to.iterdir()) if to.is_dir() else []
    foreign = [p.name for p in entries if not _is_export_file(p)]
    if foreign:
        raise ValueError(f"--to {to} holds files that no diffedit export wrote ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); export into a new or empty folder "
                         "(--overwrite replaces only a previous export's shards).")
    if entries and not overwrite:
        raise ValueError(f"--to {to} already holds an export ({len(entries)} files); pass --overwrite to replace it, "
                         "or export into a new or empty folder.")


def _write_shards(table, folder: Path, maxcount: int) -> list[str]:
    import webdataset as wds

    pattern = str(folder).replace("%", "%%") + "/edits-%06d.tar"  # ShardWriter %-formats the whole pattern
    with wds.ShardWriter(pattern, maxcount=maxcount, verbose=0, post=_fsync) as sink:
        for batch in table.to_batches(max_chunksize=256):
            for row in batch.to_pylist():  # Python ints straight from int64/int32: never through a float
                sink.write(_sample(row))
    return sorted(p.name for p in folder.glob("edits-*.tar"))


def _sample(row: dict) -> dict:
    meta = dict(key=row["key"], edit_id=row["edit_id"], shard=row["shard"], source_prompt=row["source_prompt"],
                target_prompt=row["target_prompt"], seed=row["seed"], sample_index=row["sample_index"],
                best=row["best"], width=row["width"], height=row["height"], mask_fraction=_num(row["mask_fraction"]),
                scores={c: _num(row[c]) for c in SCORE_COLUMNS})
    sample = {"__key__": row["edit_id"], "mask.png": row["mask_png"], "txt": row["target_prompt"],
              "json": json.dumps(meta, allow_nan=False).encode()}
    if row["edited_png"] is not None:
        sample["png"] = row["edited_png"]
    else:
        sample["jpg"] = row["edited_jpg"]
    return sample


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _move_into_place(tmp: Path, to: Path) -> None:
    """``to`` is new, empty, or holds only a previous export (``_check_destination``)."""
    if not to.exists() or not any(to.iterdir()):
        os.replace(tmp, to)  # a rename; it also replaces an empty folder
        return
    old = to.parent / f".{to.name}.export-{uuid.uuid4().hex}.old"
    os.replace(to, old)
    try:
        os.replace(tmp, to)
    except OSError:
        os.replace(old, to)  # put the previous export back
        raise
    shutil.rmtree(old)


def _num(v):
    """A float for strict JSON: NaN and infinities (PSNR of an unchanged region is +inf) become null."""
    return None if missing(v) or math.isinf(v) else float(v)
