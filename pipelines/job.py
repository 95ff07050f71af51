"""The job: WebDataset shards -> prompt pairs -> DiffEdit actors -> staged parts -> committed by the driver.

    from_items(shards).map_batches(read_samples) one row per sample (pipelines/shards.py: every problem an error)
      .limit(N)                                  --limit
      .flat_map(expand_sample)                   CPU: caption -> edits, their ids and seeds; committed edits dropped
      .map_batches(EditActor, actor pool)        k samples per edit: mask -> encode -> decode; best marked; the
                                                 batch written as one staged part (manifests.store)
      -> driver: commit each part by renaming it (one small row per part reaches the driver, never an image)

The driver reads as its steps: plan -> begin the store -> build the chain -> stream and commit -> summarise.
Resources (actors, GPUs, batch sizes) live here only.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from ..manifests.best import NO_SCORE_RULE, check_best_by
from ..manifests.schema import SCHEMA_VERSION, first_row, sample_id
from ..manifests.store import OutputStore
from ..stages.config import EditConfig
from .actor import EditActor, ExpandOptions, done_ids, expand_sample, read_samples
from .config import CALLS_IN_FLIGHT, IDENTITY_ADDED, JobConfig, identity, resolve_preset, serialise
from .inputs import expand_inputs
from .progress import ProgressBoard, ProgressLine, quiet_ray
from .prompts import PromptSpec
from .shards import shard_error_key


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
    """What the driver settles before any work: the shards, prompts, resolved edit, model and the run record."""
    job: JobConfig
    shards: list[str]
    spec: PromptSpec
    edit: EditConfig
    model_path: str
    run: dict


def plan_job(job: JobConfig, log) -> Plan:
    """Inputs, prompts and parameters, checked on the driver before any work starts (no weights loaded)."""
    from ..stages.sources import SHIPPED_MODEL, describe_model

    model_path = job.engine.model or str(SHIPPED_MODEL)
    if job.engine.model is None and not SHIPPED_MODEL.is_dir():
        raise FileNotFoundError(f"The shipped model is missing at {SHIPPED_MODEL}; pass --model.")
    shards = expand_inputs(list(job.inputs))
    spec = PromptSpec.load(job.input.prompts)
    probe = describe_model(model_path)  # recommended defaults + fingerprint, from the files
    job = _check_engine(job)
    if job.engine.fp8 and not job.engine.compile:
        log("note: --fp8 without --compile ran at 0.72x fp16's speed on an H200 (docs/BENCHMARKS.md): "
            "only a compiled model fuses the activations' scaling into its matmuls")
    preset = resolve_preset(job.run.preset, probe["family"])
    edit = EditConfig.from_flat({**probe["recommended"], **preset}, **job.edit)
    sizes = _edit_sizes(edit, probe)
    _check_family_options(edit, probe["family"])
    sampling = job.sampling
    run = dict(
        serialise(job, edit), inputs=list(job.inputs), model=probe["source"], model_fingerprint=probe["fingerprint"],
        model_family=probe["family"], model_recommended=probe["recommended"], resolution=probe["resolution"],
        edit_sizes=sizes,
        prompts_digest=spec.digest(),
        scorers=_describe_scorers(job, log), shards=len(shards), versions=_versions(), schema_version=SCHEMA_VERSION,
        shards_digest=hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16],
        best_rule=f"{check_best_by(sampling.best_by)} {sampling.best_by} is better (ties: the lowest sample_index); "
                  f"{NO_SCORE_RULE}",
    )
    run["identity"] = identity(run)
    run["identity_defaults"] = IDENTITY_ADDED
    return Plan(job, shards, spec, edit, str(model_path), run)


FP8_NEEDS_GPU = "--fp8 needs GPU actors (CUDA compute capability 8.9+), but "


def _check_engine(job: JobConfig) -> JobConfig:
    """Engine options refused before any work; the compile cache's folder made absolute (actors run elsewhere)."""
    engine = job.engine
    if engine.fp8 and engine.device == "cpu":
        raise ValueError(FP8_NEEDS_GPU + "this job runs on the CPU (--device cpu).")
    if not engine.compile or engine.compile_cache in (None, "off"):
        return job
    folder = Path(engine.compile_cache).expanduser().resolve()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--compile-cache {engine.compile_cache} is a file, not a folder.")
    return replace(job, engine=replace(engine, compile_cache=str(folder)))


def _edit_sizes(edit: EditConfig, probe: dict) -> list[str]:
    """The sizes the model will edit at ("WxH"): the forced --resolution (checked against the model), else the
    aspect-ratio buckets of its pixel budget (stages/images.py)."""
    from ..stages.frame import buckets, check_size

    forced = edit.frame.forced_size
    if forced is not None:
        check_size(forced, probe["size_multiple"])
    return [f"{w}x{h}" for w, h in ([forced] if forced else buckets(probe["resolution"], probe["size_multiple"]))]


def _check_family_options(edit: EditConfig, family: str) -> None:
    """Options that only some families take, refused before any work for the others."""
    from ..stages.sources import FAMILIES

    flow = ", ".join(name for name, spec in FAMILIES.items() if spec.schedule == "flow")
    diffusion = ", ".join(name for name, spec in FAMILIES.items() if spec.schedule != "flow")
    if edit.encode.shift is not None and FAMILIES[family].schedule != "flow":
        raise ValueError(f"--shift applies to the rectified-flow families ({flow}); this model is {family}.")
    unet_only = {"--solver dpm": edit.encode.solver != "ddim", "--cache-interval": edit.decode.cache_interval > 1,
                 "--encode-cache-interval": edit.encode.cache_interval > 1}
    for flag in (f for f, used in unet_only.items() if used and FAMILIES[family].schedule == "flow"):
        raise ValueError(f"{flag} applies to the UNet families ({diffusion}); this model is {family}.")


def _describe_scorers(job: JobConfig, log) -> dict | None:
    """Which score columns the actors will fill, and why not the others: from the files, no weights loaded."""
    k, best_by = job.sampling.samples_per_edit, job.sampling.best_by
    described = None
    if job.output.scores:
        from ..stages.sources import describe_scores

        described = describe_scores(job.scores)
        for column, reason in described["unavailable"].items():
            log(f"note: {column} will be null: {reason}")
    if k > 1 and (described is None or best_by in described["unavailable"]):
        why = "--no-scores" if described is None else described["unavailable"][best_by]
        raise ValueError(f"--samples-per-edit {k} picks the best sample by {best_by}, which will be null ({why}); "
                         "pass another --best-by, or make the score available.")
    return described


def _resources(ray, job: JobConfig) -> tuple[int, dict, int]:
    """(actors, per-actor resources, calls in flight per actor) for this cluster."""
    r, on_cpu = job.resources, job.engine.device == "cpu"
    # GPU actors when the cluster has GPUs, or when --num-gpus asks for them: an autoscaling cluster may have
    # no GPU node yet, and GPU actors are what make it start some.
    gpus = 0 if on_cpu else ray.cluster_resources().get("GPU", 0) or (r.num_gpus or 0) * r.gpus_per_actor
    if not gpus:
        if job.engine.fp8:
            raise ValueError(FP8_NEEDS_GPU + "the Ray cluster has no GPU.")
        return r.cpu_actors, dict(num_cpus=1), r.calls_in_flight or 1
    actors = r.num_gpus or max(1, int(gpus // r.gpus_per_actor))
    return actors, dict(num_gpus=r.gpus_per_actor), r.calls_in_flight or CALLS_IN_FLIGHT


def build_chain(ray, plan: Plan, done: frozenset, board, actors: int, resources: dict, calls: int):
    """shards -> samples (read tasks) -> limit -> edits (prompt pairs, committed dropped) -> parts (actors)."""
    job = plan.job
    # With --no-retry-errors, a shard that has a shard error row is not read again (its error row stays).
    shards = [s for s in plan.shards if sample_id(s, shard_error_key(s)) not in done]
    if not shards:
        return None
    ds = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=len(shards))
    ds = ds.map_batches(read_samples, batch_size=1, batch_format="pyarrow", fn_kwargs=dict(
        caption_field=job.input.caption_field, max_member_bytes=job.input.max_member_bytes, board=board))
    if job.run.limit is not None:
        ds = ds.limit(job.run.limit)
    expand_options, done_ref = ExpandOptions(plan.spec, job.input.caption_field, job.sampling), ray.put(done)
    # Blocks of one batch of edits: an actor call is then one batch, written as one part, so commits, progress and
    # the spread over actors stay fine-grained (a read task yields a whole shard's block).
    ds = ds.flat_map(lambda row: expand_sample(row, expand_options, done_ids(done_ref)))
    ds = ds.repartition(target_num_rows_per_block=job.resources.batch_size)
    return ds.map_batches(
        EditActor, fn_constructor_kwargs=_actor_kwargs(plan, board), batch_size=job.resources.batch_size,
        batch_format="pyarrow",
        # On GPUs, two calls per actor at once: one batch's CPU work (image decode, PNG encode) overlaps another's
        # GPU work; EditActor runs the model one batch at a time. On CPU there is no separate device to overlap.
        compute=ray.data.ActorPoolStrategy(size=actors, max_concurrent_calls_per_actor=calls,
                                           enable_true_multi_threading=calls > 1),
        **resources,
    )


def _actor_kwargs(plan: Plan, board) -> dict:
    """What an EditActor is built from: the configs it needs, passed whole."""
    job = plan.job
    k = job.sampling.samples_per_edit
    return dict(engine=replace(job.engine, model=plan.model_path), edit=plan.edit,
                scores=job.scores if job.output.scores else None, output=job.output, sampling=job.sampling,
                max_pixels=job.input.max_pixels, output_dir=job.output_dir, board=board,
                pad_to=job.resources.batch_size * k if job.engine.compile else None)


class Committer:
    """The driver's side of the stream: commits each staged part by renaming it, and counts what it holds."""

    def __init__(self, store: OutputStore, progress: ProgressLine):
        self.store, self.progress = store, progress
        self.counts: Counter = Counter()
        self.unscored_groups = self.shard_errors = 0

    def add(self, accounts: list[dict]) -> None:
        """Commit parts from their accounts (pipelines.actor.PART_SCHEMA rows)."""
        for a in accounts:
            self.store.commit_staged(a["part"])
            self.counts.update({status: a[status] for status in ("ok", "error", "skipped") if a[status]})
            self.shard_errors += a["shard_errors"]
            self.unscored_groups += a["unscored_groups"]
            self.progress.samples_done += a["samples"]
        self.progress.ok, self.progress.rows_done = self.counts["ok"], sum(self.counts.values())


def begin(store: OutputStore, plan: Plan, log) -> tuple[frozenset, bool]:
    """Start or resume the job in the store: (what expand_sample drops, whether nothing is left to do)."""
    job = plan.job
    previous = None if job.run.overwrite else store.read_run()
    retried = store.begin(plan.run, overwrite=job.run.overwrite,
                          retry=frozenset(plan.shards) if job.run.retry_errors else frozenset())
    # A completed run of the same shards (the expanded list: a glob may match new shards since) with no error to
    # retry has nothing left.
    nothing_left = bool(previous and previous.get("completed") and not retried
                        and previous.get("shards_digest") == plan.run["shards_digest"]
                        and (previous.get("run") or {}).get("limit") == job.run.limit)
    done = store.committed_ids()
    log(f"diffedit run: {len(plan.shards)} shard(s), {len(done)} edit(s) already committed in {job.output_dir}"
        + (f", {retried} edit(s) with errors to retry" if retried else ""))
    if not job.run.retry_errors:  # error rows kept: their samples are not edited beside them (by sample id)
        done |= {sample_id(shard, key) for shard, key in store.failed_samples()}
    return frozenset(done), nothing_left


def samples_done(store: OutputStore, shards: list[str]) -> int:
    """Samples of these shards committed by earlier runs, counted by their first rows (manifests.schema)."""
    read = set(shards)
    rows = store.read(columns=["shard", "edit_index", "sample_index"]).to_pylist()
    return sum(r["shard"] in read and first_row(r) for r in rows)


def stream(ray, plan: Plan, done: frozenset, committer: Committer, log) -> None:
    """Run the Ray chain and commit the parts it reports."""
    board = ray.remote(num_cpus=0)(ProgressBoard).remote(len(plan.shards))
    actors, resources, calls = _resources(ray, plan.job)
    progress = committer.progress
    progress.board, progress.actors = board, actors
    ds = build_chain(ray, plan, done, board, actors, resources, calls)
    if ds is None:
        ray.kill(board)
        log("nothing left to edit: every shard has a kept shard error row (--no-retry-errors)")
        return
    k, compiled = plan.job.sampling.samples_per_edit, plan.job.engine.compile
    where = f"GPU x {resources['num_gpus']:g} each" if "num_gpus" in resources else "CPU"
    log(f"editing with {actors} actor(s) ({where}), batch size {plan.job.resources.batch_size}"
        + (f" edits x {k} samples" if k > 1 else ""))
    progress.phase = "loading the model" + (" and compiling" if compiled else "")
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            progress.phase = "editing"
            committer.add(batch.to_pylist())
    except Exception as exc:
        # Ray Data cancels an actor pool that is still starting when no row reaches it (every edit
        # already committed) and reports that as an actor death: nothing was left to do.
        if committer.counts or "never ran" not in str(exc):
            raise
        log("nothing left to edit: every edit of these shards is committed")
    finally:
        progress.board = None
        ray.kill(board)  # a process of its own: one per job would pile up in a long-lived Ray


def run_job(job: JobConfig, log=print) -> dict:
    """Run (or resume) the job; returns the summary it prints."""
    t0, store = time.time(), OutputStore(job.output_dir)
    store.lock()  # first: a busy or unusable --output is refused before anything is loaded
    try:
        plan = plan_job(job, log)
        done, nothing_left = begin(store, plan, log)
        with quiet_ray(job.run.verbose), ProgressLine(limit=job.run.limit, interval=job.run.progress_seconds,
                                                      tty=sys.stderr.isatty()) as progress:
            progress.samples_done = samples_done(store, plan.shards)
            committer = Committer(store, progress)
            if nothing_left:
                log("nothing left to edit: the last run of this command completed")
            else:
                progress.phase = "starting Ray"
                stream(_init_ray(job.resources.address, job.run.verbose), plan, done, committer, log)
        summary = _summary(store, committer, job, time.time() - t0)
        store.finish(summary)
    finally:
        store.close()
    _final_note(job, committer, log)
    log("done: " + json.dumps(summary))
    return summary


def _final_note(job: JobConfig, committer: Committer, log) -> None:
    errors = committer.counts["error"]
    if errors:
        log(f"note: {errors} error row(s), {committer.shard_errors} of them for shards that could not be read; "
            f"`diffedit status {job.output_dir}` lists the reasons"
            + (", and rerunning this command retries them" if job.run.retry_errors else ""))


def _summary(store: OutputStore, committer: Committer, job: JobConfig, seconds: float) -> dict:
    total = Counter(store.read(columns=["status"]).column("status").to_pylist())
    counts = committer.counts
    summary = dict(new_rows=sum(counts.values()), new_by_status=dict(counts), total_by_status=dict(total),
                   seconds=round(seconds, 2), edits_per_s=round(counts["ok"] / max(seconds, 1e-9), 3),
                   output=str(Path(job.output_dir).resolve()))
    if job.sampling.samples_per_edit > 1:  # edits whose best sample could not be chosen by the score (best_rule)
        summary["new_edits_best_without_score"] = committer.unscored_groups
    return summary
