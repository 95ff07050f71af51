"""The job: WebDataset shards -> prompt pairs -> DiffEdit actors -> committed Parquet parts.

    read_webdataset(decoder=None)                one row per sample, raw member bytes
      .limit(N)                                  --limit
      .flat_map(expand_sample)                   CPU: caption -> edits; committed edits dropped (resume)
      .map_batches(EditActor, GPU actor pool)    decode, k samples per edit: mask -> encode -> decode, PNG/JPEG
      -> driver: mark best, commit parts         manifests.best (whole groups of k), manifests.OutputStore

Resources (actors, GPUs, batch sizes) live here only.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..manifests.best import DEFAULT_BEST_BY, NO_SCORE_RULE, check_best_by, complete_groups, mark_best
from ..manifests.schema import SCHEMA_VERSION
from ..manifests.store import OutputStore
from .actor import CALLS_IN_FLIGHT, ActorOptions, EditActor, ExpandOptions, committed_edits, expand_sample
from .inputs import DEFAULT_MAX_PIXELS, check_local_shard, expand_inputs
from .prompts import PromptSpec


@dataclass
class JobOptions:
    inputs: list[str]
    output: str
    model: str | None = None  # None: the shipped model
    prompts: str | None = None
    edit: dict = field(default_factory=dict)  # flat edit parameters given on the command line (None = default)
    seed: int = 0
    samples_per_edit: int = 1  # best-of-k: k seeds per edit, one row each, the best marked (manifests/best.py)
    best_by: str = DEFAULT_BEST_BY
    batch_size: int = 8  # edits per actor call (each edit is samples_per_edit images)
    num_gpus: int | None = None  # GPU actors (default: every GPU of the cluster)
    gpus_per_actor: float = 1.0
    cpu_actors: int = 1  # actors when the cluster has no GPU
    device: str = "auto"
    dtype: str = "auto"
    limit: int | None = None
    overwrite: bool = False
    address: str | None = None
    caption_field: str = "txt"
    image_format: str = "png"
    save_latents: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_batch: int | None = 64  # UNet micro-batch cap: bounds GPU memory (docs/BENCHMARKS.md)
    compile: bool = False
    calls_in_flight: int | None = None  # EditActor calls at once per actor; None: 2 on GPUs (CALLS_IN_FLIGHT), 1 on CPU
    scores: bool = True  # CLIP / LPIPS / region scores in every ok row (stages/scores.py)
    clip_model: str | None = None
    clip_weights: str | None = None
    lpips_weights: str | None = None
    rows_per_part: int = 256
    progress_seconds: float = 5.0


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("diffedit", "torch", "diffusers", "transformers", "ray", "pyarrow", "webdataset"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _init_ray(address: str | None):
    import ray

    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def run_job(o: JobOptions, log=print) -> dict:
    """Run (or resume) the job; returns the summary it prints."""
    from ..stages.config import EditConfig
    from ..stages.editor import SHIPPED_MODEL
    from ..stages.model import describe_model

    t0 = time.time()
    # 1. Inputs, prompts and parameters, checked on the driver before any work starts.
    model_path = o.model or str(SHIPPED_MODEL)
    if o.model is None and not SHIPPED_MODEL.is_dir():
        raise FileNotFoundError(f"The shipped model is missing at {SHIPPED_MODEL}; pass --model.")
    shards = expand_inputs(o.inputs)
    bad = {s: why for s in shards if (why := check_local_shard(s))}
    good = [s for s in shards if s not in bad]
    spec = PromptSpec.load(o.prompts)
    probe = describe_model(model_path)  # recommended defaults + fingerprint, without loading weights
    config = EditConfig.from_flat(probe["recommended"], **o.edit)
    k = o.samples_per_edit
    if k < 1:
        raise ValueError(f"`--samples-per-edit` must be >= 1 but is {k}.")
    better = check_best_by(o.best_by)
    score_options = None
    scores_described = None
    if o.scores:
        from ..stages.scores import ScoreConfig, Scorer

        score_options = dict(clip_model=o.clip_model, clip_weights=o.clip_weights, lpips_weights=o.lpips_weights)
        scores_described = Scorer(ScoreConfig(**score_options, device="cpu")).describe()  # what will score, or why not
        for column, reason in scores_described["unavailable"].items():
            log(f"note: {column} will be null: {reason}")
    if k > 1 and (not o.scores or o.best_by in scores_described["unavailable"]):
        why = "--no-scores" if not o.scores else scores_described["unavailable"][o.best_by]
        raise ValueError(f"--samples-per-edit {k} picks the best sample by {o.best_by}, which will be null ({why}); "
                         "pass another --best-by, or make the score available.")
    prompts_digest = hashlib.sha256(Path(o.prompts).read_bytes()).hexdigest()[:16] if o.prompts else "default"
    run = dict(
        edit=config.flat(), seed=o.seed, model=probe["source"], model_fingerprint=probe["fingerprint"],
        model_recommended=probe["recommended"], image_format=o.image_format, prompts=prompts_digest,
        caption_field=o.caption_field, save_latents=o.save_latents, resolution=probe["resolution"],
        inputs=o.inputs, shards=len(shards), versions=_versions(),
        shards_digest=hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16], scores=scores_described,
        schema_version=SCHEMA_VERSION, samples_per_edit=k, best_by=o.best_by,
        best_rule=f"{better} {o.best_by} is better (ties: the lowest sample_index); {NO_SCORE_RULE}",
        options={n: v for n, v in asdict(o).items() if n not in ("edit", "inputs", "samples_per_edit", "best_by")},
    )
    store = OutputStore(o.output)
    previous = None if o.overwrite else store.read_run()
    store.begin(run, overwrite=o.overwrite)
    # A completed run of the same shards (the expanded list: a glob may match new shards since) has nothing left.
    already_done = bool(previous and previous.get("completed") and previous.get("shards_digest") == run["shards_digest"]
                        and previous.get("options", {}).get("limit") == o.limit)
    committed = frozenset(store.committed_ids())
    log(f"diffedit run: {len(shards)} shard(s), {len(committed)} edit(s) already committed in {o.output}")

    counts: Counter = Counter()
    new_rows = 0
    unscored_groups = 0

    def commit_whole_groups(rows: list[dict]) -> list[dict]:
        """Commit rows of no edit and edits with all k samples, their best marked; return the other rows."""
        nonlocal unscored_groups
        ready, held = complete_groups(rows, k)
        if ready:
            unscored_groups += mark_best(ready, o.best_by)
            store.commit(ready)
        return held

    # 2. Unreadable shards: one error row each, so they show in the manifest and in `status`.
    from ..manifests.schema import edit_id, empty_row

    shard_rows = []
    for shard, why in bad.items():
        row = empty_row(key=f"<shard {Path(shard).name}>", shard=shard, edit_index=0, status="error", error=why)
        row["edit_id"] = edit_id(row["key"], 0, shard, "")
        if row["edit_id"] not in committed:
            shard_rows.append(row)
        log(f"warning: {why}")
    if shard_rows:
        commit_whole_groups(shard_rows)
        counts.update(r["status"] for r in shard_rows)

    # 3. The Ray Data chain.
    if already_done:
        log("nothing left to edit: the last run of this command completed")
    elif good:
        ray = _init_ray(o.address)
        # GPU actors when the cluster has GPUs, or when --num-gpus asks for them: an autoscaling cluster
        # may have no GPU node yet, and GPU actors are what make it start some.
        gpus = ray.cluster_resources().get("GPU", 0) if o.device != "cpu" else 0
        gpus = gpus or (o.num_gpus * o.gpus_per_actor if o.num_gpus and o.device != "cpu" else 0)
        if gpus:
            actors = o.num_gpus or max(1, int(gpus // o.gpus_per_actor))
            resources = dict(num_gpus=o.gpus_per_actor)
        else:
            actors, resources = o.cpu_actors, dict(num_cpus=1)
        actor_options = ActorOptions(
            model=model_path, device=o.device, dtype=o.dtype, edit=config.flat(), image_format=o.image_format,
            save_latents=o.save_latents, max_pixels=o.max_pixels, max_batch=o.max_batch, compile=o.compile,
            pad_batches_to=o.batch_size * k if o.compile else None, scores=score_options, seed=o.seed,
            samples_per_edit=k,
        )
        calls = o.calls_in_flight if o.calls_in_flight is not None else CALLS_IN_FLIGHT if gpus else 1
        if calls < 1:
            raise ValueError(f"`calls_in_flight` must be at least 1 but is {calls}.")
        expand_options = ExpandOptions(spec, o.caption_field, o.seed, k)
        committed_ref = ray.put(committed)

        def expand(row, committed_ref=committed_ref):
            return expand_sample(row, expand_options, committed_edits(committed_ref))

        ds = ray.data.read_webdataset(good, decoder=None)
        if o.limit is not None:
            ds = ds.limit(o.limit)
        ds = ds.flat_map(expand).map_batches(
            EditActor, fn_constructor_args=(actor_options,), batch_size=o.batch_size, batch_format="pyarrow",
            # On GPUs, two calls per actor at once: one batch's CPU work (image decode, PNG encode) overlaps another's
            # GPU work; EditActor runs the model one batch at a time. On CPU there is no separate device to overlap.
            compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                               enable_true_multi_threading=calls > 1),
            **resources,
        )
        log(f"editing with {actors} actor(s) ({'GPU x %g each' % o.gpus_per_actor if gpus else 'CPU'}), "
            f"batch size {o.batch_size}" + (f" edits x {k} samples" if k > 1 else ""))
        buffer: list[dict] = []
        last_flush = last_log = time.time()
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                rows = batch.to_pylist()
                buffer += rows
                counts.update(r["status"] for r in rows)
                new_rows += len(rows)
                now = time.time()
                if len(buffer) >= o.rows_per_part or now - last_flush > 30:
                    buffer, last_flush = commit_whole_groups(buffer), now
                if now - last_log >= o.progress_seconds:
                    rate = counts["ok"] / max(now - t0, 1e-9)
                    log(f"  {new_rows} rows ({dict(counts)}), {rate:.2f} edits/s")
                    last_log = now
        except Exception as exc:
            # Ray Data cancels an actor pool that is still starting when no row reaches it (every edit
            # already committed) and reports that as an actor death: nothing was left to do.
            if new_rows or "never ran" not in str(exc):
                raise
            log("nothing left to edit: every edit of these shards is committed")
        if buffer and commit_whole_groups(buffer):
            raise RuntimeError(f"some edits came back from the actors without all {k} samples: not committed; "
                               "rerun the same command to edit them again")

    seconds = time.time() - t0
    total = Counter(store.read(columns=["status"]).column("status").to_pylist())
    summary = dict(new_rows=new_rows + len(shard_rows), new_by_status=dict(counts), total_by_status=dict(total),
                   seconds=round(seconds, 2), edits_per_s=round(counts["ok"] / max(seconds, 1e-9), 3),
                   output=str(Path(o.output).resolve()))
    if k > 1:  # edits whose best sample could not be chosen by the score (run.json's best_rule says which)
        summary["new_edits_best_without_score"] = unscored_groups
    store.finish(summary)
    log("done: " + json.dumps(summary))
    return summary
