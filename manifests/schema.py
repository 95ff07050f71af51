"""The manifest: one Parquet row per (sample, edit). Readable with plain pandas/pyarrow.

Layout of an output folder OUT:
    OUT/run.json                  job parameters, package versions, model fingerprint
    OUT/manifest/part-*.parquet   committed rows; a part is written to a temporary name and renamed, so a
                                  part either exists whole or not at all (the unit of exactly-once resume)

The schema version is in every part's file metadata (``diffedit.schema_version``).
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

# 2: sample_index and best (best-of-k); 3: edit ids and seeds include the shard; 4: edits at the image's aspect
# ratio and composited onto the source: source_image, input_json, edit_width/height, composite,
# bg_changed_pixels; pandas metadata so that plain pandas reads integer columns with nulls exactly.
SCHEMA_VERSION = "4"
STATUSES = ("ok", "error", "skipped")
SCORE_COLUMNS = ("clip_source", "clip_target", "clip_directional", "clip_image", "lpips", "psnr_bg", "ssim_bg",
                 "psnr_fg", "ssim_fg")

SCHEMA = pa.schema(
    [
        ("key", pa.string()),  # the sample's __key__ (never used as a path)
        ("edit_id", pa.string()),  # stable id of (shard, key, edit index, prompts[, sample index when k > 1])
        ("edit_index", pa.int32()),
        ("sample_index", pa.int32()),  # which of the edit's k samples (0..k-1); null for rows that are no edit
        ("shard", pa.string()),
        ("source_prompt", pa.string()),
        ("target_prompt", pa.string()),
        ("status", pa.string()),  # ok | error | skipped
        ("error", pa.string()),
        ("best", pa.bool_()),  # the best ok sample of its edit by run.json's best_by (manifests/best.py)
        ("seed", pa.int64()),  # the per-edit seed
        ("width", pa.int32()),  # the source image's size (upright); source, mask and edit have it
        ("height", pa.int32()),
        ("edit_width", pa.int32()),  # the size the model edited at (stages.images.bucket_size, or --resolution)
        ("edit_height", pa.int32()),
        ("composite", pa.string()),  # "mask": the source outside the edit region; "none": the whole decode
        ("feather", pa.int32()),  # the width in pixels of the band around the mask (the edit region: stages/composite)
        ("bg_changed_pixels", pa.int64()),  # pixels outside the edit region that differ from source_image
        ("input_json", pa.string()),  # the input sample's json member (a JSON object as text), if it had one
        ("source_image", pa.binary()),  # the image the edit was made from (ok rows): stages.images.source_bytes
        ("mask_png", pa.binary()),
        ("mask_inferred", pa.bool_()),
        ("mask_fraction", pa.float32()),
        ("edited_png", pa.binary()),
        ("edited_jpg", pa.binary()),
        ("latents", pa.list_(pa.float32())),  # the edited latents, flattened (with --save-latents)
        ("latents_shape", pa.list_(pa.int32())),
        *[(name, pa.float32()) for name in SCORE_COLUMNS],
    ],
)
# The formats source_image holds as the input's own bytes (anything else is stored as PNG), with their extensions.
SOURCE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Integer columns that hold nulls: pandas would read them as float64, and a 63-bit seed would lose its low bits.
# The pandas metadata names their nullable dtypes, which pyarrow's to_pandas (and so pd.read_parquet) uses.
_NULLABLE_INTS = {"int32": "Int32", "int64": "Int64"}
_PANDAS = dict(index_columns=[], column_indexes=[], columns=[
    dict(name=f.name, field_name=f.name, pandas_type=str(f.type), numpy_type=_NULLABLE_INTS[str(f.type)], metadata=None)
    for f in SCHEMA if str(f.type) in _NULLABLE_INTS])
SCHEMA = SCHEMA.with_metadata({b"diffedit.schema_version": SCHEMA_VERSION.encode(),
                               b"pandas": json.dumps(_PANDAS).encode()})


def sample_id(shard: str, key: str) -> str:
    """A sample's identity in a job: its shard's canonical URL (``pipelines.inputs.canonical_shard``) and its
    key. The same key in two shards is two samples; moving a shard gives its samples new identities."""
    return f"{shard}\x1f{key}"


def edit_id(shard: str, key: str, edit_index: int, source_prompt: str, target_prompt: str,
            sample_index: int | None = None) -> str:
    """Stable across runs and machines: the same sample (shard, key) and edit always get the same id.

    ``sample_index`` is given only when an edit has several samples (k > 1).
    """
    parts = [sample_id(shard, key), str(edit_index), source_prompt, target_prompt]
    text = "\x1f".join(parts if sample_index is None else [*parts, f"sample {int(sample_index)}"])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def edit_ids(shard: str, key: str, edit_index: int, source_prompt: str, target_prompt: str, k: int = 1) -> list[str]:
    """The ids of an edit's k samples (best-of-k); with k = 1, the edit's own id."""
    if k == 1:
        return [edit_id(shard, key, edit_index, source_prompt, target_prompt)]
    return [edit_id(shard, key, edit_index, source_prompt, target_prompt, s) for s in range(k)]


def first_row(row: dict) -> bool:
    """Whether ``row`` is its sample's first (edit 0, sample 0): every sample has exactly one, error and skipped
    samples included, so counting these counts samples."""
    return row["edit_index"] == 0 and not row["sample_index"]


def empty_row(**values) -> dict:
    row = {name: None for name in SCHEMA.names}
    row.update(values)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{n: r.get(n) for n in SCHEMA.names} for r in rows], schema=SCHEMA)


def missing(value) -> bool:
    """Whether a manifest value is missing: None, or a float NaN (pandas' null in a float column)."""
    return value is None or (isinstance(value, float) and value != value)
