"""The Ray-facing callables: shard reading and prompt expansion (CPU tasks), and the edit actor (GPU, or CPU).

Thin adapters: the mathematics is ``diffedit.stages.editor.edit_batch``; the row format is
``diffedit.manifests.schema``; the output layout is ``diffedit.manifests.store``. One actor loads the weights
once and runs the three DiffEdit steps fused on its device, so latents never leave it; it writes each batch's
rows as one staged Parquet part and returns only a one-row account of it (PART_SCHEMA), which the driver
commits by renaming the part: no image passes through the driver.
"""

from __future__ import annotations

import io
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from ..manifests.best import mark_best
from ..manifests.schema import edit_ids, empty_row, first_row, missing, sample_id
from ..manifests.store import OutputStore
from ..stages.config import EditConfig, ScoreConfig
from .config import EngineConfig, OutputConfig, SamplingConfig
from .inputs import open_image, sample_from_raw
from .prompts import PromptSpec
from .shards import shard_error_key

SAMPLE_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
                           ("caption", pa.string()), ("label", pa.string()), ("mask", pa.binary()),
                           ("error", pa.string()), ("json", pa.string())])
SAMPLES_PER_YIELD = 32  # Ray Data merges what a task yields into blocks of up to its target block size (128 MiB)
# What an actor call returns: one row per part it staged (its file name and what it holds).
PART_SCHEMA = pa.schema([("part", pa.string()), ("ok", pa.int64()), ("error", pa.int64()), ("skipped", pa.int64()),
                         ("samples", pa.int64()), ("shard_errors", pa.int64()), ("unscored_groups", pa.int64())])


def read_samples(batch: pa.Table, caption_field: str, max_member_bytes: int, board=None):
    """``map_batches`` generator: shard URLs -> their samples (SAMPLE_SCHEMA), every problem an ``error``.
    A shard streams out: it is never held whole in memory."""
    from .progress import report
    from .shards import iter_shard

    for shard in batch.column("shard").to_pylist():
        rows, n = [], 0
        for raw in iter_shard(shard, max_member_bytes):
            rows.append(asdict(sample_from_raw(raw, shard, caption_field)))
            n += 1
            if len(rows) == SAMPLES_PER_YIELD:
                yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=SAMPLE_SCHEMA)
        report(board, "shard_read", n)


_DONE: dict[str, frozenset] = {}


def done_ids(ref) -> frozenset:
    """The ids that expand_sample drops, behind a Ray object ref, fetched once per worker process, not per row."""
    key = ref.hex()
    if key not in _DONE:
        import ray

        _DONE.clear()
        _DONE[key] = ray.get(ref)
    return _DONE[key]


@dataclass(frozen=True)
class ExpandOptions:
    prompts: PromptSpec
    caption_field: str
    sampling: SamplingConfig


def expand_sample(sample: dict, options: ExpandOptions, done: frozenset) -> list[dict]:
    """One sample (SAMPLE_SCHEMA) -> one pending row per edit, or one skipped/error row; each with its edit ids
    and seeds (``_edit_ids``, ``_seeds``: one per sample of best-of-k, computed here only). Dropped: edits
    already committed (an edit's samples are committed together, in one part, so its first id is enough), and
    samples in ``done`` by sample id (kept with their error row: --no-retry-errors)."""
    shard, key = sample["shard"], sample["key"]
    if sample_id(shard, key) in done:
        return []
    base = dict(key=key, shard=shard, _image=None, _mask=None, source_prompt=sample["caption"],
                input_json=sample["json"])
    edits = [] if sample["error"] else options.prompts.edits(key, sample["caption"], sample["label"])
    if sample["error"]:
        rows = [empty_row(**base, edit_index=0, status="error", error=sample["error"])]
    elif not edits:
        reason = options.prompts.skip_reason(key, sample["caption"], sample["label"])
        rows = [empty_row(**base, edit_index=0, status="skipped", error=reason)]
    else:
        rows = [empty_row(**{**base, "_image": sample["image"], "_mask": sample["mask"], "edit_index": i,
                             "status": "pending", "source_prompt": e.source_prompt, "target_prompt": e.target_prompt})
                for i, e in enumerate(edits)]
    for r in rows:
        _assign_samples(r, options.sampling)
    return [r for r in rows if r["edit_id"] not in done]


def _assign_samples(row: dict, sampling: SamplingConfig) -> None:
    """The ids and seeds of an edit's samples (k of them; one for a row that is no edit)."""
    from ..stages.randomness import edit_seed

    shard, key, i = row["shard"], row["key"], row["edit_index"]
    pending = row["status"] == "pending"
    k = sampling.samples_per_edit if pending else 1
    row["_edit_ids"] = edit_ids(shard, key, i, row["source_prompt"] or "", row["target_prompt"] or "", k)
    row["_seeds"] = [edit_seed(sampling.seed, sample_id(shard, key), i, s) for s in range(k)] if pending else [None]
    row.update(edit_id=row["_edit_ids"][0], seed=row["_seeds"][0])


class EditActor:
    """``map_batches`` callable: a batch of rows -> pending rows edited (k samples each, best marked), every row
    written as one staged part (manifests.store) -> one PART_SCHEMA row.

    On GPUs the job runs it with two calls in flight (threads): the model runs one batch at a time, under
    ``self._device``, while the other call decodes its inputs or encodes its outputs (PIL releases the GIL
    there), so the GPU does not wait for the CPU between batches.
    """

    def __init__(self, engine: EngineConfig, edit: EditConfig, scores: ScoreConfig | None, output: OutputConfig,
                 sampling: SamplingConfig, max_pixels: int, output_dir: str, pad_to: int | None = None, board=None):
        from .progress import report

        t0 = time.time()
        self.store = OutputStore(output_dir)
        self.store.check_staging()  # on a cluster, every node must see --output (a shared folder)
        self.writer = _writer()
        self.edit, self.output, self.sampling, self.max_pixels, self.pad_to = edit, output, sampling, max_pixels, pad_to
        self._device = threading.Lock()  # one batch at a time on the model (and the scorer)
        self._graphs_saved = 0  # graphs compiled when the compile cache was last written
        self.model, self.compiled = _engine_model(engine, output_dir)
        from ..stages.editor import check_frame

        check_frame(self.model, edit.frame)  # a forced --resolution this model cannot take fails the job at once
        self.scorer = None
        if scores is not None:
            from dataclasses import replace

            from ..stages.scores import Scorer

            self.scorer = Scorer(replace(scores, device=str(self.model.device)))
        report(board, "actor_ready", f"model loaded on {self.model.device} in {time.time() - t0:.0f} s"
               + (f", compiling at its first batch ({len(self.compiled.known) if self.compiled else 0} graphs in the "
                  "compile cache)" if engine.compile else ""))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            rows += self._samples(r) if r["status"] == "pending" else [r]
        pending = [r for r in rows if r["status"] == "pending"]
        if pending:
            self._edit(pending)
            self._save_compiled()
        unscored = mark_best(rows, self.sampling.best_by)
        return pa.Table.from_pylist([_account(rows, self.store.stage(rows, self.writer), unscored)], schema=PART_SCHEMA)

    def _save_compiled(self) -> None:
        """Add the graphs this actor compiled since its last save to the shared compile cache (once per new shape)."""
        if self.compiled is None:
            return
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        with self._device:
            if graphs != self._graphs_saved:
                self._graphs_saved = graphs
                try:
                    self.compiled.save()
                except OSError as exc:  # a cache that cannot be written costs the next actor a compile, not this job
                    warnings.warn(f"compile cache not written: {exc}", stacklevel=1)

    def _samples(self, row: dict) -> list[dict]:
        """Best-of-k: an edit's k samples, its image decoded once, edited in this call as k independent edits
        batched together (each its own seed, so its own mask noise too), written together."""
        from ..stages.images import source_bytes, to_rgb

        try:
            row["_pil"] = to_rgb(open_image(row["_image"], self.max_pixels))
            row["width"], row["height"] = row["_pil"].size
            row["_source"] = source_bytes(row["_image"], row["_pil"])
            row["_user_mask"] = None if missing(row["_mask"]) else _open_mask(row["_mask"], self.max_pixels)
        except ValueError as exc:
            row.update(status="error", error=str(exc))
        return [{**row, "sample_index": s, "edit_id": edit_id, "seed": seed}
                for s, (edit_id, seed) in enumerate(zip(row["_edit_ids"], row["_seeds"]))]

    def _edit(self, rows: list[dict]) -> None:
        try:
            self._edit_batch(rows)
        except Exception:  # isolate: one bad item must not fail its batch-mates
            if len(rows) == 1:
                rows[0].update(status="error", error="edit failed: " + traceback.format_exc(limit=3)[-1500:])
                return
            for r in rows:
                self._edit([r])

    def _edit_batch(self, rows: list[dict]) -> None:
        """Edit the rows (each at its edit size, composited back at its own), score them, fill their columns."""
        from ..stages.editor import edit_images

        edits = edit_images(self.model, [r["_pil"] for r in rows], [r["source_prompt"] for r in rows],
                            [r["target_prompt"] for r in rows], [int(r["seed"]) for r in rows], self.edit,
                            [r["_user_mask"] for r in rows], pad_to=self.pad_to, lock=self._device,
                            keep_latents=self.output.save_latents)
        if self.scorer is not None:
            with self._device:  # background scores outside the edit region (stages/composite.py), as the count
                scores = self.scorer.score([r["_pil"] for r in rows], [e.image for e in edits],
                                           [e.region for e in edits], [r["source_prompt"] for r in rows],
                                           [r["target_prompt"] for r in rows])
            for i, r in enumerate(rows):
                r.update({name: values[i] for name, values in scores.items()})
        for r, e in zip(rows, edits):
            r.update(status="ok", error=None, mask_inferred=e.inferred, edit_width=e.edit_size[0],
                     edit_height=e.edit_size[1], composite=self.edit.frame.composite, feather=e.feather,
                     source_image=r["_source"],
                     **_images(e, r["_pil"], self.output))
            if e.latents is not None:
                r.update(latents=e.latents.flatten().numpy(), latents_shape=list(e.latents.shape))


def _engine_model(engine: EngineConfig, output_dir: str):
    """(the model as ``engine`` asks: loaded, in fp8, compiled; its compile cache, loaded, or None)."""
    from ..stages.compile_cache import CompileCache
    from ..stages.model import load_model

    model = load_model(engine.model, device=engine.device, dtype=engine.dtype, max_batch=engine.max_batch)
    if engine.fp8:
        model.to_fp8()
    if not engine.compile:
        return model, None
    folder = engine.compile_cache or str(Path(output_dir) / "compile-cache")
    cache = None if folder == "off" else CompileCache(folder, model.device)
    if cache:
        cache.load()
    model.compile(mode=None if engine.compile_mode == "default" else engine.compile_mode)  # lazy: at each new shape
    return model, cache


def encode_image(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _images(edit, source, output: OutputConfig) -> dict:
    """An edited row's image columns: the mask PNG, its area (at the image's resolution), the edit in the chosen
    format, and how many pixels outside the edit region differ from ``source`` in the image as stored (PNG is
    lossless; JPEG re-encodes every pixel, so there the count is of its rounding, not of the edit)."""
    import numpy as np
    from PIL import Image

    from ..stages.composite import changed_outside
    from ..stages.scores import mask_fraction

    column = "edited_jpg" if output.image_format == "jpeg" else "edited_png"
    mask = Image.fromarray(edit.mask.astype("uint8") * 255, "L")
    data = encode_image(Image.fromarray(edit.image), output.image_format)
    changed = edit.bg_changed_pixels
    if output.image_format == "jpeg":
        changed = changed_outside(np.asarray(source), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                                  edit.region)
    return {"mask_png": encode_image(mask, "png"), "mask_fraction": mask_fraction(edit.mask), column: data,
            "bg_changed_pixels": changed}


def _account(rows: list[dict], part: str, unscored: int) -> dict:
    """The one-row account of a staged part that the driver receives."""
    status = [r["status"] for r in rows]
    return dict(part=part, ok=status.count("ok"), error=status.count("error"), skipped=status.count("skipped"),
                samples=sum(map(first_row, rows)),
                shard_errors=sum(r["status"] == "error" and r["key"] == shard_error_key(r["shard"]) for r in rows),
                unscored_groups=unscored)


def _writer() -> str:
    """Who writes this actor's parts (their ``diffedit.writer`` metadata): the Ray node and the process."""
    import os

    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return f"node {node}, pid {os.getpid()}"


def _open_mask(data: bytes, max_pixels: int):
    try:
        return open_image(data, max_pixels)
    except ValueError as exc:
        raise ValueError(f"mask member: {exc}") from None
