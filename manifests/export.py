"""`diffedit status` and `diffedit export`: reading a manifest folder back.

Export writes the kept edits as WebDataset shards for a training loader, one sample per edit:
``__key__`` = the edit_id (safe as a name; the original key is in the json), ``png``/``jpg`` = the edit,
``mask.png``, ``txt`` = the target prompt, ``json`` = key, prompts, seed, sample index, best, scores.
With best-of-k (``--samples-per-edit k``) every ok sample is exported unless ``best_only``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pandas as pd

from .schema import SCORE_COLUMNS
from .store import OutputStore


def status(out: str | Path) -> dict:
    store = OutputStore(out)
    run = store.read_run()
    if run is None:
        raise FileNotFoundError(f"{out} holds no diffedit job (no run.json).")
    table = store.read(columns=["shard", "key", "edit_index", "sample_index", "best", "status", "error", "mask_fraction",
                                *SCORE_COLUMNS])
    df = table.to_pandas()
    errors = Counter(str(e).split(":")[0][:80] for e in df.loc[df.status == "error", "error"])
    scores = {}
    for col in ["mask_fraction", *SCORE_COLUMNS]:
        values = df.loc[df.status == "ok", col].dropna()
        if len(values):
            q = values.quantile([0.1, 0.5, 0.9])
            scores[col] = dict(mean=float(values.mean()), p10=float(q[0.1]), p50=float(q[0.5]), p90=float(q[0.9]))
    return dict(
        output=str(Path(out).resolve()),
        rows=len(df),
        by_status=dict(Counter(df.status)),
        completed=bool(run.get("completed")),
        left=("nothing: the last run completed" if run.get("completed") else
              "the last run did not complete: rerun the same `diffedit run` command to finish it"),
        top_errors=dict(errors.most_common(5)),
        scores=scores,
        best_of_k=_best_of_k(df, run),
    )


def _best_of_k(df: pd.DataFrame, run: dict) -> dict:
    """Edits (groups of k samples), how many have a best row, and how many chose it without the score."""
    edits = df[df.sample_index.notna()]
    ok = edits[edits.status == "ok"]
    by = run.get("best_by")
    out = dict(samples_per_edit=run.get("samples_per_edit", 1), best_by=by,
               edits=int(edits.groupby(["shard", "key", "edit_index"]).ngroups),
               edits_with_an_ok_sample=int(ok.groupby(["shard", "key", "edit_index"]).ngroups),
               best_rows=int((df.best == True).sum()))  # noqa: E712 (best may hold nulls: old or foreign rows)
    if by in df:  # as manifests.best.mark_best counts them: several ok samples, none with the score
        n = ok.groupby(["shard", "key", "edit_index"])[by].agg(["size", "count"])
        out["edits_best_without_score"] = int(((n["size"] > 1) & (n["count"] == 0)).sum())
    return out


def export(out: str | Path, to: str | Path, where: str | None = None, best_only: bool = False,
           maxcount: int = 10000) -> dict:
    """Write ``ok`` rows (only the best sample of each edit with ``best_only``; filtered by a pandas ``query``
    expression) as WebDataset shards under ``to``."""
    import webdataset as wds

    df = OutputStore(out).read().to_pandas()
    df = df[df.status == "ok"]
    if best_only:
        if len(df) and df.best.isna().all():
            raise ValueError("--best-only: these rows have no `best` mark (a manifest older than schema version 2).")
        df = df[df.best == True]  # noqa: E712
    if where:
        try:
            df = df.query(where, engine="python")
        except Exception as exc:
            raise ValueError(f"--where {where!r} is not a valid filter over the manifest's columns: {exc}") from exc
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    written = 0
    with wds.ShardWriter(str(to / "edits-%06d.tar"), maxcount=maxcount, verbose=0) as sink:
        for row in df.itertuples(index=False):
            meta = dict(key=row.key, edit_id=row.edit_id, shard=row.shard, source_prompt=row.source_prompt,
                        target_prompt=row.target_prompt, seed=int(row.seed), sample_index=_int(row.sample_index),
                        best=None if pd.isna(row.best) else bool(row.best), width=int(row.width),
                        height=int(row.height), mask_fraction=_num(row.mask_fraction),
                        scores={c: _num(getattr(row, c)) for c in SCORE_COLUMNS})
            sample = {"__key__": row.edit_id, "mask.png": row.mask_png, "txt": row.target_prompt,
                      "json": json.dumps(meta).encode()}
            if row.edited_png is not None:
                sample["png"] = row.edited_png
            else:
                sample["jpg"] = row.edited_jpg
            sink.write(sample)
            written += 1
    return dict(exported=written, to=str(to.resolve()), where=where, best_only=best_only)


def _int(v):
    return None if v is None or pd.isna(v) else int(v)


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) or pd.isna(v) else float(v)
