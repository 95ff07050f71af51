"""The job: WebDataset shards -> prompt pairs -> DiffEdit actors -> committed Parquet parts.

    from_items(shards).map_batches(read_samples) one row per sample (pipelines/shards.py: every problem an error)
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
from ..manifests.schema import SCHEMA_VERSION, sample_id
from ..manifests.store import OutputStore
from .actor import (CALLS_IN_FLIGHT, ActorOptions, EditActor, ExpandOptions, committed_edits, expand_sample,
                    read_samples)
from .inputs import DEFAULT_MAX_PIXELS, expand_inputs
from .progress import ProgressBoard, ProgressLine, quiet_ray
from .prompts import PromptSpec
from .shards import DEFAULT_MAX_MEMBER_BYTES, shard_error_key


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
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES  # larger tar members are refused before they are read
    retry_errors: bool = True  # a rerun computes again the edits that have error rows (manifests/store.py)
    verbose: bool = False  # Ray's own logs on the terminal
    max_batch: int | None = 64  # UNet micro-batch cap: bounds GPU memory (docs/BENCHMARKS.md)
    compile: bool = False
    calls_in_flight: int | None = None  # EditActor calls at once per actor; None: 2 on GPUs (CALLS_IN_FLIGHT), 1 on CPU
    scores: bool = True  # CLIP / LPIPS / region scores in every ok row (stages/scores.py)
    clip_model: str | None = None
    clip_weights: str | None = None
    lpips_weights: str | None = None
    rows_per_part: int = 256
    progress_seconds: float | None = None  # between progress lines (default: 1 s on a terminal, 15 s in a log)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("diffedit", "torch", "diffusers", "transformers", "ray", "pyarrow", "webdataset"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _init_ray(address: str | None, verbose: bool = False):
    import ray

    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=verbose, configure_logging=verbose)
        ray.init(address=address, **kwargs) if address else ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


@dataclass
class Plan:
    """What the driver settles before any work: the shards, prompts, parameters and the run record."""
    shards: list[str]
    spec: PromptSpec
    config: object  # stages.config.EditConfig
    model_path: str
    score_options: dict | None
    run: dict


def plan_job(o: JobOptions, log) -> Plan:
    """Inputs, prompts and parameters, checked on the driver before any work starts (no weights loaded)."""
    from ..stages.config import EditConfig
    from ..stages.editor import SHIPPED_MODEL
    from ..stages.model import describe_model

    model_path = o.model or str(SHIPPED_MODEL)
    if o.model is None and not SHIPPED_MODEL.is_dir():
        raise FileNotFoundError(f"The shipped model is missing at {SHIPPED_MODEL}; pass --model.")
    shards = expand_inputs(o.inputs)
    spec = PromptSpec.load(o.prompts)
    probe = describe_model(model_path)  # recommended defaults + fingerprint, without loading weights
    config = EditConfig.from_flat(probe["recommended"], **o.edit)
    if o.limit is not None and o.limit < 1:
        raise ValueError(f"`--limit` must be >= 1 but is {o.limit}.")
    k = o.samples_per_edit
    if k < 1:
        raise ValueError(f"`--samples-per-edit` must be >= 1 but is {k}.")
    if o.calls_in_flight is not None and o.calls_in_flight < 1:
        raise ValueError(f"`calls_in_flight` must be at least 1 but is {o.calls_in_flight}.")
    better = check_best_by(o.best_by)
    score_options, scores_described = None, None
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
    run = dict(
        edit=config.flat(), seed=o.seed, model=probe["source"], model_fingerprint=probe["fingerprint"],
        model_recommended=probe["recommended"], image_format=o.image_format, prompts=spec.digest(),
        caption_field=o.caption_field, save_latents=o.save_latents, resolution=probe["resolution"],
        inputs=o.inputs, shards=len(shards), versions=_versions(),
        shards_digest=hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16], scores=scores_described,
        schema_version=SCHEMA_VERSION, samples_per_edit=k, best_by=o.best_by,
        best_rule=f"{better} {o.best_by} is better (ties: the lowest sample_index); {NO_SCORE_RULE}",
        options={n: v for n, v in asdict(o).items() if n not in ("edit", "inputs", "samples_per_edit", "best_by")},
    )
    return Plan(shards, spec, config, model_path, score_options, run)


def _resources(ray, o: JobOptions) -> tuple[int, dict, int]:
    """(actors, per-actor resources, calls in flight per actor) for this cluster."""
    # GPU actors when the cluster has GPUs, or when --num-gpus asks for them: an autoscaling cluster may have
    # no GPU node yet, and GPU actors are what make it start some.
    gpus = ray.cluster_resources().get("GPU", 0) if o.device != "cpu" else 0
    gpus = gpus or (o.num_gpus * o.gpus_per_actor if o.num_gpus and o.device != "cpu" else 0)
    if not gpus:
        return o.cpu_actors, dict(num_cpus=1), o.calls_in_flight or 1
    actors = o.num_gpus or max(1, int(gpus // o.gpus_per_actor))
    return actors, dict(num_gpus=o.gpus_per_actor), o.calls_in_flight or CALLS_IN_FLIGHT


def build_chain(ray, o: JobOptions, plan: Plan, committed: frozenset, board, actors: int, resources: dict, calls: int):
    """shards -> samples (read tasks) -> limit -> edits (prompt pairs, committed dropped) -> edited rows (actors)."""
    k = o.samples_per_edit
    actor_options = ActorOptions(
        model=plan.model_path, device=o.device, dtype=o.dtype, edit=plan.config.flat(), image_format=o.image_format,
        save_latents=o.save_latents, max_pixels=o.max_pixels, max_batch=o.max_batch, compile=o.compile,
        pad_batches_to=o.batch_size * k if o.compile else None, scores=plan.score_options, seed=o.seed,
        samples_per_edit=k, board=board,
    )
    expand_options = ExpandOptions(plan.spec, o.caption_field, o.seed, k)
    committed_ref = ray.put(committed)

    def expand(row, committed_ref=committed_ref):
        return expand_sample(row, expand_options, committed_edits(committed_ref))

    # With --no-retry-errors, a shard that has a shard error row is not read again (its error row stays).
    shards = [s for s in plan.shards if sample_id(s, shard_error_key(s)) not in committed]
    if not shards:
        return None
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(read_samples, batch_size=1, batch_format="pyarrow",
                        fn_kwargs=dict(caption_field=o.caption_field, max_member_bytes=o.max_member_bytes, board=board))
    if o.limit is not None:
        ds = ds.limit(o.limit)
    # Blocks of one batch of edits: an actor task is then one batch, and its rows reach the driver when it ends, so
    # commits, progress and the spread over actors stay fine-grained (a read task yields a whole shard's block).
    ds = ds.flat_map(expand).repartition(target_num_rows_per_block=o.batch_size)
    return ds.map_batches(
        EditActor, fn_constructor_args=(actor_options,), batch_size=o.batch_size, batch_format="pyarrow",
        # On GPUs, two calls per actor at once: one batch's CPU work (image decode, PNG encode) overlaps another's
        # GPU work; EditActor runs the model one batch at a time. On CPU there is no separate device to overlap.
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                           enable_true_multi_threading=calls > 1),
        **resources,
    )


def _first_row(row: dict) -> bool:
    """Whether ``row`` is its sample's first (edit 0, sample 0): every sample has exactly one, error and skipped
    samples included."""
    return row["edit_index"] == 0 and not row["sample_index"]


class Committer:
    """The driver's side of the stream: counts rows, marks best of k, commits whole edits in parts."""

    def __init__(self, store: OutputStore, o: JobOptions, progress: ProgressLine, shards: list[str]):
        self.store, self.o, self.progress = store, o, progress
        self.counts: Counter = Counter()
        self.unscored_groups = 0
        self.shard_errors = 0
        self.buffer: list[dict] = []
        self.last_flush = time.time()
        # Samples done, for the progress line, counted by their first row (no set grows with the job); those
        # committed by earlier runs count too, since their rows never come back.
        read = set(shards)
        done = store.read(columns=["shard", "edit_index", "sample_index"]).to_pylist()
        progress.samples_done = sum(_first_row(r) for r in done if r["shard"] in read)

    def add(self, rows: list[dict]) -> None:
        self.buffer += rows
        self.counts.update(r["status"] for r in rows)
        self.shard_errors += sum(r["status"] == "error" and r["key"] == shard_error_key(r["shard"]) for r in rows)
        self.progress.samples_done += sum(_first_row(r) for r in rows)
        self.progress.ok = self.counts["ok"]
        self.progress.rows_done = sum(self.counts.values())
        if len(self.buffer) >= self.o.rows_per_part or time.time() - self.last_flush > 30:
            self.flush()

    def flush(self) -> None:
        """Commit rows of no edit and edits with all k samples, their best marked; keep the other rows."""
        ready, self.buffer = complete_groups(self.buffer, self.o.samples_per_edit)
        if ready:
            self.unscored_groups += mark_best(ready, self.o.best_by)
            self.store.commit(ready)
        self.last_flush = time.time()

    def close(self) -> None:
        self.flush()
        if self.buffer:
            raise RuntimeError(f"some edits came back from the actors without all {self.o.samples_per_edit} samples: "
                               "not committed; rerun the same command to edit them again")


def _done(store: OutputStore, o: JobOptions, committed: set[str]) -> frozenset:
    """What expand_sample drops: the committed edit ids and, when error rows are kept (--no-retry-errors), the
    sample ids (manifests.schema.sample_id) of the samples that have one, so a repaired sample is not edited
    beside its error row."""
    done = set(committed)
    if not o.retry_errors:
        done |= {sample_id(shard, key) for shard, key in store.failed_samples()}
    return frozenset(done)


def stream(ray, o: JobOptions, plan: Plan, store: OutputStore, committer: Committer, committed: set[str],
           log) -> None:
    """Run the Ray chain and commit what it yields."""
    board = ray.remote(num_cpus=0)(ProgressBoard).remote(len(plan.shards))
    committer.progress.board = board
    actors, resources, calls = _resources(ray, o)
    committer.progress.actors = actors
    ds = build_chain(ray, o, plan, _done(store, o, committed), board, actors, resources, calls)
    if ds is None:
        ray.kill(board)
        log("nothing left to edit: every shard has a kept shard error row (--no-retry-errors)")
        return
    k = o.samples_per_edit
    log(f"editing with {actors} actor(s) ({'GPU x %g each' % resources['num_gpus'] if 'num_gpus' in resources else 'CPU'}), "
        f"batch size {o.batch_size}" + (f" edits x {k} samples" if k > 1 else ""))
    committer.progress.phase = "loading the model" + (" and compiling" if o.compile else "")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            committer.progress.phase = "editing"
            committer.add(batch.to_pylist())
    except Exception as exc:
        # Ray Data cancels an actor pool that is still starting when no row reaches it (every edit
        # already committed) and reports that as an actor death: nothing was left to do.
        if committer.counts or "never ran" not in str(exc):
            raise
        log("nothing left to edit: every edit of these shards is committed")
    finally:
        committer.progress.board = None
        ray.kill(board)  # a process of its own: one per job would pile up in a long-lived Ray
    committer.close()


def run_job(o: JobOptions, log=print) -> dict:
    """Run (or resume) the job; returns the summary it prints."""
    t0 = time.time()
    store = OutputStore(o.output)
    store.lock()  # first: a busy or unusable --output is refused before anything is loaded
    try:
        plan = plan_job(o, log)
        previous = None if o.overwrite else store.read_run()
        retried = store.begin(plan.run, overwrite=o.overwrite,
                              retry=frozenset(plan.shards) if o.retry_errors else frozenset())
        # A completed run of the same shards (the expanded list: a glob may match new shards since) with no error
        # to retry has nothing left.
        already_done = bool(previous and previous.get("completed") and not retried
                            and previous.get("shards_digest") == plan.run["shards_digest"]
                            and previous.get("options", {}).get("limit") == o.limit)
        committed = store.committed_ids()
        log(f"diffedit run: {len(plan.shards)} shard(s), {len(committed)} edit(s) already committed in "
            f"{o.output}" + (f", {retried} edit(s) with errors to retry" if retried else ""))
        tty = sys.stderr.isatty()
        with quiet_ray(o.verbose), ProgressLine(limit=o.limit, interval=o.progress_seconds, tty=tty) as progress:
            committer = Committer(store, o, progress, plan.shards)
            if already_done:
                log("nothing left to edit: the last run of this command completed")
            else:
                progress.phase = "starting Ray"
                stream(_init_ray(o.address, o.verbose), o, plan, store, committer, committed, log)
        summary = _summary(store, committer, o, time.time() - t0)
        store.finish(summary)
    finally:
        store.close()
    if committer.counts["error"]:
        log(f"note: {committer.counts['error']} error row(s), {committer.shard_errors} of them for shards that could not "
            f"be read; `diffedit status {o.output}` lists the reasons"
            + (", and rerunning this command retries them" if o.retry_errors else ""))
    log("done: " + json.dumps(summary))
    return summary


def _summary(store: OutputStore, committer: Committer, o: JobOptions, seconds: float) -> dict:
    total = Counter(store.read(columns=["status"]).column("status").to_pylist())
    counts = committer.counts
    summary = dict(new_rows=sum(counts.values()), new_by_status=dict(counts), total_by_status=dict(total),
                   seconds=round(seconds, 2), edits_per_s=round(counts["ok"] / max(seconds, 1e-9), 3),
                   output=str(Path(o.output).resolve()))
    if o.samples_per_edit > 1:  # edits whose best sample could not be chosen by the score (run.json's best_rule)
        summary["new_edits_best_without_score"] = committer.unscored_groups
    return summary
