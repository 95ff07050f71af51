"""The Ray-facing callables: shard reading and prompt expansion (CPU tasks), and the edit actor (GPU, or CPU).

Thin adapters: the mathematics is ``diffedit.stages.editor.edit_batch``; the row format is
``diffedit.manifests.schema``. One actor loads the weights once and runs the three DiffEdit steps fused
on its device, so latents never leave it.
"""

from __future__ import annotations

import io
import threading
import time
import traceback
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from ..manifests.schema import edit_id, empty_row, sample_id, to_table
from .inputs import open_image, sample_from_raw
from .prompts import PromptSpec


CALLS_IN_FLIGHT = 2  # EditActor calls at once per GPU actor (threads): one on the GPU, one on the CPU


@dataclass(frozen=True)
class ExpandOptions:
    prompts: PromptSpec
    caption_field: str
    seed: int
    samples_per_edit: int = 1


_COMMITTED: dict[str, frozenset] = {}


def committed_edits(ref) -> frozenset:
    """The committed edit_ids behind a Ray object ref, fetched once per worker process, not once per row."""
    key = ref.hex()
    if key not in _COMMITTED:
        import ray

        _COMMITTED.clear()
        _COMMITTED[key] = ray.get(ref)
    return _COMMITTED[key]


SAMPLE_SCHEMA = pa.schema([("key", pa.string()), ("shard", pa.string()), ("image", pa.binary()),
                           ("caption", pa.string()), ("label", pa.string()), ("mask", pa.binary()),
                           ("error", pa.string())])
SAMPLES_PER_YIELD = 32  # Ray Data merges what a task yields into blocks of up to its target block size (128 MiB)


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


def edit_samples(row: dict, seed: int, k: int) -> list[dict]:
    """The k samples of one edit: sample index, own seed and edit_id. With k = 1, the edit's own seed and id."""
    from ..stages.randomness import edit_seed

    shard, key, i = row["shard"], row["key"], row["edit_index"]
    prompts = (row["source_prompt"] or "", row["target_prompt"] or "")
    return [dict(sample_index=s, seed=edit_seed(seed, sample_id(shard, key), i, s),
                 edit_id=edit_id(shard, key, i, *prompts, s if k > 1 else None)) for s in range(k)]


def expand_sample(sample: dict, options: ExpandOptions, committed: frozenset) -> list[dict]:
    """One sample (SAMPLE_SCHEMA) -> one row per edit (status pending; the actor makes its k samples), or one
    skipped/error row; committed edits dropped (an edit's samples are committed together, so one committed id
    is enough)."""
    if sample_id(sample["shard"], sample["key"]) in committed:  # kept with its error row (--no-retry-errors)
        return []
    base = dict(key=sample["key"], shard=sample["shard"], _image=None, _mask=None)
    if sample["error"]:
        rows = [empty_row(**base, edit_index=0, status="error", error=sample["error"], source_prompt=sample["caption"])]
    else:
        edits = options.prompts.edits(sample["key"], sample["caption"], sample["label"])
        if not edits:
            reason = options.prompts.skip_reason(sample["key"], sample["caption"], sample["label"])
            rows = [empty_row(**base, edit_index=0, status="skipped", error=reason, source_prompt=sample["caption"])]
        else:
            rows = [
                empty_row(**{**base, "_image": sample["image"], "_mask": sample["mask"]}, edit_index=i,
                          status="pending", source_prompt=e.source_prompt, target_prompt=e.target_prompt)
                for i, e in enumerate(edits)
            ]
    kept = []
    for r in rows:
        if r["status"] == "pending":
            samples = edit_samples(r, options.seed, options.samples_per_edit)
            r.update(samples[0])
            if not any(s["edit_id"] in committed for s in samples):
                kept.append(r)
        else:
            r["edit_id"] = edit_id(r["shard"], r["key"], r["edit_index"], r["source_prompt"] or "", "")
            if r["edit_id"] not in committed:
                kept.append(r)
    return kept


@dataclass(frozen=True)
class ActorOptions:
    model: str
    device: str = "auto"
    dtype: str = "auto"
    edit: dict | None = None  # flat edit parameters
    image_format: str = "png"
    save_latents: bool = False
    max_pixels: int = 64_000_000
    max_batch: int | None = None
    compile: bool = False
    pad_batches_to: int | None = None
    scores: dict | None = None  # ScoreConfig fields; None: no scoring
    seed: int = 0  # the job's seed: each sample of an edit gets its own from it (stages/randomness.py)
    samples_per_edit: int = 1
    board: object = None  # the job's ProgressBoard (pipelines/progress.py), told when the model is ready


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpeg":
        image.save(buf, "JPEG", quality=95)
    else:
        image.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


class EditActor:
    """``map_batches`` callable: pending rows -> edited rows; other rows pass through.

    On GPUs the job runs it with two calls in flight (``CALLS_IN_FLIGHT``, threads): the model runs one batch at a
    time, under ``self._device``, while the other call decodes its inputs or encodes its outputs (PIL releases the
    GIL there), so the GPU does not wait for the CPU between batches.
    """

    def __init__(self, options: ActorOptions):
        from ..stages.config import EditConfig
        from ..stages.model import load_model

        from .progress import report

        t0 = time.time()
        self.options = options
        self._device = threading.Lock()  # one batch at a time on the model (and the scorer)
        self.model = load_model(options.model, device=options.device, dtype=options.dtype)
        if options.compile:
            self.model.compile()  # lazy: the first batch of each shape compiles
        self.config = EditConfig.from_flat(options.edit or {})
        self.scorer = None
        if options.scores is not None:
            from ..stages.scores import ScoreConfig, Scorer

            self.scorer = Scorer(ScoreConfig(**{**options.scores, "device": str(self.model.device)}))
        report(options.board, "actor_ready", f"model loaded on {self.model.device} in {time.time() - t0:.0f} s"
               + (", compiling at its first batch" if options.compile else ""))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = []
        for r in batch.to_pylist():
            if r["status"] == "pending":
                try:
                    r["_pil"] = open_image(r["_image"], self.options.max_pixels)
                    r["width"], r["height"] = r["_pil"].size
                    r["_user_mask"] = None if not _has(r.get("_mask")) else _open_mask(r["_mask"], self.options.max_pixels)
                except ValueError as exc:
                    r.update(status="error", error=str(exc))
                # Best-of-k: the edit's k samples, decoded once, edited in this call as k independent edits
                # batched together (each its own seed, so its own mask noise too), returned together.
                rows += [{**r, **s} for s in edit_samples(r, self.options.seed, self.options.samples_per_edit)]
            else:
                rows.append(r)
        pending = [r for r in rows if r["status"] == "pending"]
        if pending:
            self._edit(pending)
        return to_table(rows)

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
        from ..stages.editor import edit_batch
        from ..stages.images import images_to_tensor, mask_to_image, masks_to_tensor, tensor_to_images
        from ..stages.mask import upsample_map

        m, res = self.model, self.model.resolution
        images = images_to_tensor([r["_pil"] for r in rows], res)
        masks = [None if r["_user_mask"] is None else masks_to_tensor([r["_user_mask"]], res)[0] for r in rows]
        with self._device:
            out = edit_batch(
                m, images.to(m.device), [r["source_prompt"] for r in rows], [r["target_prompt"] for r in rows],
                [int(r["seed"]) for r in rows], self.config, masks=masks, max_batch=self.options.max_batch,
                pad_to=self.options.pad_batches_to,
            )
            edited_BCHW, mask_Bhw, inferred = out.edited_BCHW.cpu(), out.mask_Bhw.cpu(), out.inferred
            latents_BChw = out.latents_BChw.float().cpu() if self.options.save_latents else None
            del out
        sizes = [(r["width"], r["height"]) for r in rows]
        edited = tensor_to_images(edited_BCHW, sizes)
        full = upsample_map(mask_Bhw, (res, res))
        masks_full = [mask_to_image(full[i], sizes[i]) for i in range(len(rows))]
        column = "edited_jpg" if self.options.image_format == "jpeg" else "edited_png"
        if self.scorer is not None:
            with self._device:
                scores = self.scorer.score([r["_pil"] for r in rows], edited, masks_full,
                                           [r["source_prompt"] for r in rows], [r["target_prompt"] for r in rows])
            for i, r in enumerate(rows):
                r.update({name: values[i] for name, values in scores.items() if name != "mask_fraction"})
        for i, r in enumerate(rows):
            mask = masks_full[i]
            r.update(
                status="ok", error=None, mask_png=encode_image(mask, "png"), mask_inferred=inferred[i],
                mask_fraction=float(np.asarray(mask).mean() / 255.0),
            )
            r[column] = encode_image(edited[i], self.options.image_format)
            if self.options.save_latents:
                lat = latents_BChw[i]
                r.update(latents=lat.flatten().numpy(), latents_shape=list(lat.shape))



def _open_mask(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return open_image(data, max_pixels)
    except ValueError as exc:
        raise ValueError(f"mask member: {exc}") from None


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and np.isnan(value))
