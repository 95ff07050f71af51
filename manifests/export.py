"""`diffedit status` and `diffedit export`: reading a manifest folder back.

Export writes each kept edit (``ok`` rows; only the best sample of each edit with ``best_only``; only where the
``--where`` filter of ``filter.py`` holds, never pandas' ``query``) as one training pair, in one of two layouts:

``webdataset`` (shards ``edits-NNNNNN.tar``), one sample per pair, ``__key__`` = the edit_id (hex: safe as a name,
and no dot, which WebDataset would split on)::

    <edit_id>.source.jpg|png|webp  the image the edit was made from (its own bytes; the extension from its content)
    <edit_id>.edited.png|jpg       the edit, at the source's size
    <edit_id>.mask.png             the mask (L, 0/255), at the source's size
    <edit_id>.txt                  the target prompt
    <edit_id>.source.txt           the source prompt
    <edit_id>.json                 the row's facts (``_meta``), the input sample's json (``input``), the run's
                                   parameters (``run``)

so that ``webdataset.WebDataset(urls).decode("pil")`` gives PIL images under "source.jpg", "edited.png",
"mask.png", str under "txt" and "source.txt", a dict under "json".

``parquet`` (files ``pairs-NNNNN.parquet``, row groups of ``ROW_GROUP_ROWS``), one row per pair, in the columns
InstructPix2Pix-style training scripts read: ``input_image``, ``edit_prompt``, ``edited_image``, then
``source_prompt``, ``mask`` and the row's facts (``PAIRS_SCHEMA``). Images are Hugging Face ``datasets`` Image
structs (``{bytes, path}``) and the schema carries ``datasets``' features (``huggingface`` metadata), so
``load_dataset("parquet", ...)`` decodes them to PIL; the run's parameters are the files' ``diffedit.run``
metadata.

Both stream: the manifest is read part by part and row group by row group, the filter's columns first and the
images only of row groups that keep a row, and written as it is read, so memory does not grow with the number of
rows. Integers stay exact (pyarrow, never a float64): a 63-bit seed is exported as it is. The json is strict JSON:
a NaN or missing score is null; an infinite one (PSNR of an unchanged region) is null in ``scores`` and named in
``infinite_scores`` (``{"psnr_bg": "+inf"}``). A row without a ``source_image`` (a manifest older than schema
version 4) is exported without a source (no ``source.*`` member; a null ``input_image``) and counted in
``without_source``; ``--where "source_image is not null"`` leaves such rows out. ``export.json``, written last
beside the files, records the export.
"""

from __future__ import annotations

import functools
import glob
import io
import json
import math
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .filter import Expr, FilterError, parse
from .schema import SCHEMA, SCHEMA_VERSION, SCORE_COLUMNS, SOURCE_FORMATS, missing
from .store import OutputStore

MEASURES = ("mask_fraction", *SCORE_COLUMNS)  # the numbers `status` summarises
FORMATS = ("webdataset", "parquet")
READ_COLUMNS = ("key", "edit_id", "edit_index", "sample_index", "shard", "source_prompt", "target_prompt", "best",
                "seed", "width", "height", "edit_width", "edit_height", "composite", "feather", "bg_changed_pixels",
                "input_json", "source_image", "mask_png", "mask_inferred", "mask_fraction", "edited_png", "edited_jpg",
                *SCORE_COLUMNS)  # what a pair is made of
EXPORT_MARKER = "export.json"  # what was exported, from where, with which filter; written last
EXPORT_FILE = re.compile(r"edits-[0-9]+\.tar|pairs-[0-9]+\.parquet")  # the files an export writes
READ_ROWS = 64  # rows per batch read from the manifest (with their images)
READ_BUFFER = 1 << 20  # bytes: column chunks are read in pieces of this size, not whole
ROW_GROUP_ROWS = 100  # rows per row group of a pairs file (datasets' own choice for image datasets)
ROW_GROUP_BYTES = 64 << 20  # ... or fewer, past this many bytes

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets' Image feature in Arrow
PAIRS_SCHEMA = pa.schema([
    ("input_image", IMAGE), ("edit_prompt", pa.string()), ("edited_image", IMAGE), ("source_prompt", pa.string()),
    ("mask", IMAGE), *[SCHEMA.field(n) for n in ("key", "edit_id")], ("shard_uri", pa.string()),
    *[SCHEMA.field(n) for n in ("edit_index", "sample_index", "best", "seed", "width", "height", "edit_width",
                                "edit_height", "composite", "feather", "bg_changed_pixels", "mask_inferred",
                                "mask_fraction",
                                *SCORE_COLUMNS, "input_json")]])


def _features(schema: pa.Schema) -> bytes:
    """``datasets``' features of ``schema`` as its ``huggingface`` schema metadata: Image for the image structs,
    Value(dtype) for the rest (``datasets.Features.from_arrow_schema`` reads it)."""
    dtype = {pa.float32(): "float32", pa.float64(): "float64"}  # Arrow calls them float and double
    features = {f.name: {"_type": "Image"} if f.type == IMAGE else {"dtype": dtype.get(f.type, str(f.type)),
                                                                      "_type": "Value"} for f in schema}
    return json.dumps({"info": {"features": features}}).encode()


LAYOUT = dict(  # export.json's description of what each format holds
    webdataset=dict(members=["source.jpg|source.png|source.webp", "edited.png|edited.jpg", "mask.png", "txt",
                             "source.txt", "json"], key="edit_id"),
    parquet=dict(columns=PAIRS_SCHEMA.names, images="datasets Image structs {bytes, path}",
                 run_metadata="diffedit.run"))


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
           format: str = "webdataset", max_pairs: int = 10_000, max_bytes: int = 1 << 30,
           overwrite: bool = False) -> dict:
    """Write the kept edits of the job in ``out`` as training pairs under ``to`` (see the module docstring for
    the ``format``s), at most ``max_pairs`` pairs and about ``max_bytes`` bytes a file.

    ``to`` must be new or empty; ``overwrite`` replaces a previous export there, and refuses a folder holding
    anything else. The files are written into a temporary folder beside ``to`` and moved into place at the
    end, so ``to`` holds either the whole export or what it held before.
    """
    # 1. Check the arguments, the job, the filter and the destination before reading or writing anything.
    _check_options(format, max_pairs, max_bytes)
    store = _job_store(out)
    expr = _parse_where(where)
    to = Path(to).resolve()
    _check_destination(to, overwrite)
    run = _run_params(store.read_run())

    # 2. Stream the kept rows into the files, in a temporary folder beside `to`; then move it into place.
    counts = Counter()
    tmp = _fresh_temporary_folder(to)
    try:
        sink = (_TarSink if format == "webdataset" else _ParquetSink)(tmp, run, max_pairs, max_bytes)
        try:
            for batch in _kept_batches(store, expr, best_only, counts):
                sink.write(batch, counts)
        finally:
            files = sink.close()
        _check_best_marks(best_only, counts)
        result = dict(exported=counts["exported"], without_source=counts["without_source"], to=str(to),
                      format=format, where=where, best_only=best_only)
        marker = dict(result, source=str(Path(out).resolve()), rows_read=counts["rows"], ok_rows=counts["ok"],
                      files=files, layout=LAYOUT[format], run=run, schema_version=SCHEMA_VERSION)
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=1, allow_nan=False))
        _move_into_place(tmp, to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _check_options(format: str, max_pairs: int, max_bytes: int) -> None:
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: the formats are {', '.join(FORMATS)}.")
    if max_pairs < 1:
        raise ValueError(f"--per-file must be >= 1 but is {max_pairs}.")
    if max_bytes < 1:
        raise ValueError(f"--max-mb must be > 0 but gives {max_bytes} bytes.")


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


def _run_params(run: dict | None) -> dict:
    """What every pair carries of run.json: the model, its fingerprint, the edit and sampling parameters."""
    run = run or {}
    return _strict(dict(model=run.get("model"), model_fingerprint=run.get("model_fingerprint"),
                        edit=run.get("edit"), sampling=run.get("sampling"), schema_version=run.get("schema_version")))


def _check_best_marks(best_only: bool, counts: Counter) -> None:
    if best_only and counts["ok"] and not counts["best_marked"]:
        raise ValueError("--best-only: these rows have no `best` mark (a manifest older than schema version 2).")


# -- reading: part by part, row group by row group ----------------------------------------------------------


def _kept_batches(store: OutputStore, expr: Expr | None, best_only: bool,
                  counts: Counter) -> Iterator[pa.RecordBatch]:
    """The kept rows as record batches of ``READ_COLUMNS``. Each row group's status, best and filter columns are
    read first; its images only when it keeps a row, ``READ_ROWS`` rows at a time."""
    tests = sorted({"status", "best", *(expr.columns if expr else ())})
    for part in store.part_files():
        with pq.ParquetFile(part, buffer_size=READ_BUFFER) as pf:
            for group in range(pf.num_row_groups):
                keep = np.concatenate([np.zeros(0, bool), *(_keep(b, expr, best_only, counts)
                                                            for b in _batches(pf, group, tests))])
                if not keep.any():
                    continue
                offset = 0
                for batch in _batches(pf, group, READ_COLUMNS):
                    kept = keep[offset:offset + batch.num_rows]
                    offset += batch.num_rows
                    if kept.any():
                        yield batch.filter(pa.array(kept))


def _batches(pf: pq.ParquetFile, group: int, names) -> Iterator[pa.RecordBatch]:
    """Row group ``group`` of ``pf``: batches of ``names`` in the manifest's types; columns that an older part
    lacks are null."""
    present = [n for n in names if n in pf.schema_arrow.names]
    for batch in pf.iter_batches(batch_size=READ_ROWS, row_groups=[group], columns=present):
        arrays = [batch.column(n).cast(SCHEMA.field(n).type) if n in present
                  else pa.nulls(batch.num_rows, SCHEMA.field(n).type) for n in names]
        yield pa.RecordBatch.from_arrays(arrays, schema=pa.schema([SCHEMA.field(n) for n in names]))


def _keep(batch: pa.RecordBatch, expr: Expr | None, best_only: bool, counts: Counter) -> np.ndarray:
    """Which rows of ``batch`` are kept: ``ok``, best with ``best_only``, and where ``expr`` is true."""
    keep = _bools(pc.equal(batch["status"], "ok"))
    counts["rows"] += batch.num_rows
    counts["ok"] += int(keep.sum())
    if best_only:
        counts["best_marked"] += int((keep & _bools(batch["best"].is_valid())).sum())
        keep &= _bools(batch["best"])
    if expr is not None and keep.any():  # evaluated over the rows kept so far, as on the whole manifest
        keep[keep] = expr.mask(batch.filter(pa.array(keep))).to_numpy()
    return keep


def _bools(array: pa.Array) -> np.ndarray:
    return pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(bool)


# -- the pairs ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _uri(shard: str | None) -> str | None:
    """A shard as an absolute URI: a URL as it is, a local path as file:///... ."""
    if shard is None or "://" in shard:
        return shard
    return Path(shard).resolve().as_uri()


def _source_extension(data: bytes, edit_id: str) -> str:
    """The member extension of a source image, from its content: jpg, png or webp (what the job stores), else
    the format PIL finds."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return SOURCE_FORMATS.get(im.format, str(im.format).lower())
    except Exception as exc:  # a corrupt manifest: name the row
        raise ValueError(f"edit {edit_id}: its source_image is not an image ({exc})") from None


def _strict(value):
    """``value`` for strict JSON: non-finite floats (NaN, inf) become null, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _meta(row: dict, run: dict) -> dict:
    """A pair's json: the row's facts, its scores (null for NaN and inf; ``infinite_scores`` names the infinite
    ones), the input sample's json fields (``input``) and the run's parameters (``run``)."""
    scores = {c: row[c] for c in SCORE_COLUMNS}
    meta = {k: row[k] for k in ("key", "edit_id")}
    meta["shard_uri"] = _uri(row["shard"])
    meta.update({k: row[k] for k in ("edit_index", "sample_index", "best", "seed", "source_prompt", "target_prompt",
                                     "width", "height", "edit_width", "edit_height", "composite", "feather",
                                     "bg_changed_pixels", "mask_inferred")})
    meta["mask_fraction"] = _num(row["mask_fraction"])
    meta["scores"] = {c: _num(v) for c, v in scores.items()}
    meta["infinite_scores"] = {c: "+inf" if v > 0 else "-inf" for c, v in scores.items()
                               if not missing(v) and math.isinf(v)}
    meta["input"] = None if row["input_json"] is None else _strict(json.loads(row["input_json"]))
    meta["run"] = run
    return meta


def _sample(row: dict, run: dict) -> dict:
    """A pair as a WebDataset sample (the module docstring's members)."""
    sample = {"__key__": row["edit_id"], "mask.png": row["mask_png"], "txt": (row["target_prompt"] or "").encode(),
              "source.txt": (row["source_prompt"] or "").encode(),
              "json": json.dumps(_meta(row, run), allow_nan=False).encode()}
    if row["source_image"] is not None:
        sample[f"source.{_source_extension(row['source_image'], row['edit_id'])}"] = row["source_image"]
    if row["edited_png"] is not None:
        sample["edited.png"] = row["edited_png"]
    else:
        sample["edited.jpg"] = row["edited_jpg"]
    return sample


def _image(data: pa.Array) -> pa.StructArray:
    """Image bytes as datasets' Image structs {bytes, path: null}; a null image stays null."""
    return pa.StructArray.from_arrays([data, pa.nulls(len(data), pa.string())], fields=list(IMAGE),
                                      mask=data.is_null())


def _pairs(batch: pa.RecordBatch) -> pa.Table:
    """Kept rows in ``PAIRS_SCHEMA``."""
    columns = dict(input_image=_image(batch["source_image"]), edit_prompt=batch["target_prompt"],
                   edited_image=_image(pc.coalesce(batch["edited_png"], batch["edited_jpg"])),
                   mask=_image(batch["mask_png"]),
                   shard_uri=pa.array([_uri(s) for s in batch["shard"].to_pylist()], pa.string()))
    arrays = [columns[n] if n in columns else batch[n] for n in PAIRS_SCHEMA.names]
    return pa.Table.from_arrays(arrays, schema=PAIRS_SCHEMA)


# -- writing --------------------------------------------------------------------------------------------------


class _TarSink:
    """WebDataset shards ``edits-NNNNNN.tar``, written with webdataset's ShardWriter."""

    def __init__(self, folder: Path, run: dict, max_pairs: int, max_bytes: int):
        import webdataset as wds

        pattern = str(folder).replace("%", "%%") + "/edits-%06d.tar"  # ShardWriter %-formats the whole pattern
        self.folder, self.run = folder, run
        self.writer = wds.ShardWriter(pattern, maxcount=max_pairs, maxsize=max_bytes, verbose=0, post=_fsync)

    def write(self, batch: pa.RecordBatch, counts: Counter) -> None:
        for row in batch.to_pylist():  # Python ints straight from int64/int32: never through a float
            self.writer.write(_sample(row, self.run))
            counts["exported"] += 1
            counts["without_source"] += row["source_image"] is None

    def close(self) -> list[str]:
        self.writer.close()
        return sorted(p.name for p in self.folder.glob("edits-*.tar"))


class _ParquetSink:
    """Parquet files ``pairs-NNNNN.parquet`` in ``PAIRS_SCHEMA``, with datasets' features and the run's
    parameters in their metadata; rows are buffered into row groups of ``ROW_GROUP_ROWS`` (or
    ``ROW_GROUP_BYTES``)."""

    def __init__(self, folder: Path, run: dict, max_pairs: int, max_bytes: int):
        self.folder, self.max_pairs, self.max_bytes = folder, max_pairs, max_bytes
        self.schema = PAIRS_SCHEMA.with_metadata({b"huggingface": _features(PAIRS_SCHEMA),
                                                  b"diffedit.run": json.dumps(run, allow_nan=False).encode(),
                                                  b"diffedit.schema_version": SCHEMA_VERSION.encode()})
        self.pending: list[pa.Table] = []  # rows not written yet: less than a row group
        self.writer, self.files, self.rows, self.bytes = None, [], 0, 0  # the open file, and what it holds

    def write(self, batch: pa.RecordBatch, counts: Counter) -> None:
        self.pending.append(_pairs(batch))
        counts["exported"] += batch.num_rows
        counts["without_source"] += batch["source_image"].null_count
        if (sum(t.num_rows for t in self.pending) >= ROW_GROUP_ROWS
                or sum(t.nbytes for t in self.pending) >= ROW_GROUP_BYTES):
            self._flush()

    def _flush(self) -> None:
        """Write the pending rows, starting a new file whenever the open one holds ``max_pairs`` rows or
        ``max_bytes`` bytes."""
        table = pa.concat_tables(self.pending)
        self.pending = []
        while table.num_rows:
            if self.writer is None or self.rows >= self.max_pairs or self.bytes >= self.max_bytes:
                self._next_file()
            head, table = table.slice(0, self.max_pairs - self.rows), table.slice(self.max_pairs - self.rows)
            self.writer.write_table(head, row_group_size=ROW_GROUP_ROWS)
            self.rows, self.bytes = self.rows + head.num_rows, self.bytes + head.nbytes

    def _next_file(self) -> None:
        self._close_file()
        self.files.append(f"pairs-{len(self.files):05d}.parquet")
        self.writer = pq.ParquetWriter(self.folder / self.files[-1], self.schema, **_codecs(self.schema))
        self.rows, self.bytes = 0, 0

    def _close_file(self) -> None:
        if self.writer is not None:
            self.writer.close()
            _fsync(self.folder / self.files[-1])
            self.writer = None

    def close(self) -> list[str]:
        if self.pending:
            self._flush()
        self._close_file()
        return list(self.files)


def _codecs(schema: pa.Schema) -> dict:
    """ParquetWriter options: image bytes (compressed already) stored as they are, without a dictionary; the
    other columns Snappy-compressed, with dictionaries."""
    images = [f.name for f in schema if f.type == IMAGE]
    leaves = [f"{n}.{child.name}" for n in images for child in IMAGE] + [f.name for f in schema if f.name not in images]
    return dict(compression={leaf: "NONE" if leaf.endswith(".bytes") else "SNAPPY" for leaf in leaves},
                use_dictionary=[leaf for leaf in leaves if not leaf.endswith(".bytes")])


def _fsync(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# -- the destination ------------------------------------------------------------------------------------------


def _fresh_temporary_folder(to: Path) -> Path:
    """A new, empty folder beside ``to`` to write the export into, after removing any a killed export left."""
    to.parent.mkdir(parents=True, exist_ok=True)
    for stale in to.parent.glob(f".{glob.escape(to.name)}.export-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    tmp = to.parent / f".{to.name}.export-{uuid.uuid4().hex}.partial"
    tmp.mkdir()
    return tmp


def _is_export_file(path: Path) -> bool:
    """A file a previous export wrote (a shard, a pairs file or the marker): the only files ``overwrite`` removes."""
    return path.is_file() and (path.name == EXPORT_MARKER or EXPORT_FILE.fullmatch(path.name) is not None)


def _check_destination(to: Path, overwrite: bool) -> None:
    if to.exists() and not to.is_dir():
        raise ValueError(f"--to {to} is a file, not a folder.")
    entries = sorted(to.iterdir()) if to.is_dir() else []
    foreign = [p.name for p in entries if not _is_export_file(p)]
    if foreign:
        raise ValueError(f"--to {to} holds files that no diffedit export wrote ({', '.join(foreign[:5])}"
                         f"{', ...' if len(foreign) > 5 else ''}); export into a new or empty folder "
                         "(--overwrite replaces only a previous export's files).")
    if entries and not overwrite:
        raise ValueError(f"--to {to} already holds an export ({len(entries)} files); pass --overwrite to replace it, "
                         "or export into a new or empty folder.")


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
