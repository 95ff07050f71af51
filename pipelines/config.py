"""The job's typed configs, one per component, each passed whole to what owns it.

    EditConfig     (stages/config.py)  the three DiffEdit steps: what changes an edit's pixels
    ScoreConfig    (stages/scores.py)  which models score the edits
    EngineConfig   the model and how an actor runs it (device, dtype, micro-batch, compile)
    InputConfig    what is read: prompts, caption field, size limits
    SamplingConfig seeds and best-of-k
    OutputConfig   what is written per row
    ResourceConfig actors, GPUs, batch size (never changes a row)
    RunConfig      how this invocation behaves (never changes a row)

Each field that the command line offers is declared once, with its help, by ``stages.config.option``; the CLI's
flags are generated from these fields (``pipelines/cli.py``) and ``run.json`` is these configs serialised.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from ..manifests.best import BETTER, DEFAULT_BEST_BY, check_best_by
from ..stages.config import FLAT_KEYS, EditConfig, ScoreConfig, check, flag_name, option
from .inputs import DEFAULT_MAX_PIXELS
from .shards import DEFAULT_MAX_MEMBER_BYTES

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
CALLS_IN_FLIGHT = 2  # EditActor calls at once per GPU actor (threads): one on the GPU, one on the CPU


@dataclass(frozen=True)
class EngineConfig:
    """The model and how each actor runs it."""

    model: str | None = option(None, "diffusers model folder or hub id (default: the shipped shapes model)")
    device: str = option("auto", "where actors run the model (auto: CUDA if the actor sees one); cpu also stops GPU "
                                 "scheduling", choices=("auto", "cpu", "cuda"))
    dtype: str = option("auto", "model dtype (auto: fp16 on CUDA, fp32 on CPU)", choices=("auto", "fp32", "fp16", "bf16"))
    # One UNet call's batch is capped (the mask's n noise samples multiply it): bounds GPU memory, at no cost in
    # throughput from 64 on an H200 at SD 1.5 scale (docs/BENCHMARKS.md).
    max_batch: int | None = option(64, "cap on one UNet call's batch (bounds GPU memory)")
    compile: bool = option(False, "torch.compile the UNet and the VAE in each actor (GPU; about 1.5 min at the start "
                                  "without a warm --compile-cache)")
    # reduce-overhead: CUDA graphs around each compiled call (fixed shapes; the job pads its batches).
    compile_mode: str = option("default", "torch.compile mode with --compile: default, reduce-overhead (CUDA graphs; "
                                          "no faster at 32 edits a batch on an H200) or max-autotune",
                               choices=COMPILE_MODES)
    # Every actor loads the folder's compiled graphs before compiling and adds those it built (stages/compile_cache.py).
    compile_cache: str | None = option(None, "folder of compiled graphs shared by every actor and run with --compile, "
                                             "on a path all nodes see (default: OUTPUT/compile-cache; 'off': none)")
    fp8: bool = option(False, "the denoiser's linear layers in float8 with dynamic scaling (torchao; CUDA compute "
                              "capability 8.9+: Ada, Hopper, Blackwell; compiled, as fast as fp16 at SD 1.5 scale; "
                              "slower uncompiled)")

    def __post_init__(self):
        check(self.max_batch is None or self.max_batch >= 1, f"`--max-batch` must be >= 1 but is {self.max_batch}.")
        check(self.compile_mode in COMPILE_MODES,
              f"`--compile-mode` must be one of {', '.join(COMPILE_MODES)} but is {self.compile_mode!r}.")
        check(self.compile or (self.compile_mode == "default" and self.compile_cache is None),
              "`--compile-mode` and `--compile-cache` need `--compile`.")


@dataclass(frozen=True)
class InputConfig:
    """What is read: the prompts, the caption, the limits on inputs."""

    prompts: str | None = option(None, "YAML/JSON rules, labels or pair table (.parquet/.csv/.jsonl); default: colour "
                                       "and shape swaps (red<->blue, circle<->square, ...)")
    caption_field: str = option("txt", "'txt' (the txt member, else json's 'caption'), or a field name of the json "
                                       "member")
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse larger images (decompression bombs)")
    max_member_bytes: int = option(DEFAULT_MAX_MEMBER_BYTES, "refuse tar members larger than this, before reading "
                                                             "them")

    def __post_init__(self):
        check(self.max_pixels >= 1, f"`--max-pixels` must be >= 1 but is {self.max_pixels}.")
        check(self.max_member_bytes >= 1, f"`--max-member-bytes` must be >= 1 but is {self.max_member_bytes}.")


@dataclass(frozen=True)
class SamplingConfig:
    """Seeds and best-of-k."""

    seed: int = option(0, "global seed; each edit's noise comes from (seed, shard, key, edit)")
    samples_per_edit: int = option(1, "best-of-k: edit each (sample, edit) with K seeds, one row each (sample_index "
                                      "0..K-1), and mark the best by --best-by in the `best` column")
    best_by: str = option(DEFAULT_BEST_BY, "the score that picks the best of K samples: higher is better, except "
                                           "lpips (lower)", choices=tuple(BETTER))

    def __post_init__(self):
        check(self.samples_per_edit >= 1, f"`--samples-per-edit` must be >= 1 but is {self.samples_per_edit}.")
        check_best_by(self.best_by)


@dataclass(frozen=True)
class OutputConfig:
    """What each row holds."""

    image_format: str = option("png", "format of the edited images", choices=("png", "jpeg"))
    save_latents: bool = option(False, "store the edited latents in the manifest")
    scores: bool = option(True, "the quality scores in every ok row (CLIP, directional CLIP, LPIPS, background "
                                "PSNR/SSIM)")


@dataclass(frozen=True)
class ResourceConfig:
    """Actors, GPUs and batches: never change a row."""

    # A batch is what one actor call edits, and what it writes as one Parquet part (the unit of resume).
    batch_size: int = option(8, "edits per actor call, and rows per committed Parquet part (x K with "
                                "--samples-per-edit); 32 suits a 24 GB GPU at SD 1.5 scale")
    num_gpus: int | None = option(None, "number of GPU actors (default: every GPU in the cluster)")
    gpus_per_actor: float = option(1.0, "GPUs per actor (0.5 puts two actors on a GPU)")
    cpu_actors: int = option(1, "actors when the cluster has no GPU")
    calls_in_flight: int | None = option(None, f"actor calls at once per actor (default: {CALLS_IN_FLIGHT} on GPUs, "
                                               "so one batch's image coding overlaps another's GPU work; 1 on CPU)")
    address: str | None = option(None, "Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")

    def __post_init__(self):
        for name in ("batch_size", "cpu_actors", "calls_in_flight", "num_gpus"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"`--{name.replace('_', '-')}` must be >= 1 but is {value}.")
        check(self.gpus_per_actor > 0, f"`--gpus-per-actor` must be positive but is {self.gpus_per_actor}.")


# --preset: edit parameters chosen together, each of which passed the quality gate on the shapes benchmark
# (docs/BENCHMARKS.md, "Faster edits"). A flag given explicitly wins over the preset; the preset wins over the
# model's diffedit.json. name -> (the families it was measured on, its values).
PRESETS = {"fast": (("sd", "sdxl"), {"steps": 25, "solver": "dpm", "cache_interval": 2})}


def check_preset(name: str | None) -> None:
    check(name is None or name in PRESETS, f"`--preset` must be one of {', '.join(PRESETS)} but is {name!r}.")


def resolve_preset(name: str | None, family: str) -> dict:
    """The edit parameters of preset ``name`` for a model of ``family`` ({} for None)."""
    check_preset(name)
    if name is None:
        return {}
    families, values = PRESETS[name]
    check(family in families, f"--preset {name} is defined for {', '.join(families)} models (measured on them "
                              f"only); this model is {family}. Set the flags one by one instead.")
    return dict(values)


@dataclass(frozen=True)
class RunConfig:
    """How this invocation behaves: never changes a row (a preset only through the edit parameters it sets, which
    run.json records and a resume compares)."""

    preset: str | None = option(None, "edit parameters chosen together: fast (25 steps of DPM-Solver++(2M), deep "
                                      "features reused every 2nd decoding step: 1.9x the default's edits/s at its "
                                      "quality on the shapes benchmark; docs/BENCHMARKS.md); flags given explicitly "
                                      "win", choices=tuple(PRESETS))
    limit: int | None = option(None, "edit only the first N samples")
    overwrite: bool = option(False, "delete an existing job in --output and start again")
    retry_errors: bool = option(True, "a rerun edits again the edits that have error rows (--no-retry-errors keeps "
                                      "them)")
    verbose: bool = option(False, "show Ray's own log lines (hidden by default)", aliases=("-v",))
    progress_seconds: float | None = option(None, "seconds between progress lines on stderr (default: 1, rewritten in "
                                                  "place, on a terminal; 15 in a log)")

    def __post_init__(self):
        check(self.limit is None or self.limit >= 1, f"`--limit` must be >= 1 but is {self.limit}.")
        check_preset(self.preset)


# The components of a job: name -> config class. The names are run.json's sections and JobConfig's fields.
COMPONENTS = {"engine": EngineConfig, "input": InputConfig, "sampling": SamplingConfig, "output": OutputConfig,
              "scores": ScoreConfig, "resources": ResourceConfig, "run": RunConfig}
# What changes rows: a rerun with other values would mix two jobs in one manifest. Config leaves by name, and
# the run record's derived values: the model's fingerprint, the prompts' digest, the resolution, the scorers.
IDENTITY = ("caption_field", "seed", "samples_per_edit", "best_by", "image_format", "save_latents", "scores", "fp8",
            *FLAT_KEYS)
# Identity keys added after jobs were recorded without them, with the value such a job ran at: resuming it with
# that value is the same job (manifests.store.check_same_job).
IDENTITY_ADDED = {"solver": "ddim", "encode_cache_interval": 1, "cache_interval": 1, "fp8": False}
DERIVED_IDENTITY = ("model_fingerprint", "prompts_digest", "resolution", "scorers")


def cli_fields(cls) -> list:
    """The fields of a config class that the command line offers (those declared with ``option``)."""
    return [f for f in fields(cls) if "help" in f.metadata]


@dataclass(frozen=True)
class JobConfig:
    """A whole job: where from, where to, and one config per component. ``edit`` holds the edit parameters given
    explicitly (flat keys, stages.config.FLAT_KEYS); the others come from the model's diffedit.json, else the
    paper."""
    inputs: tuple[str, ...]
    output_dir: str
    edit: dict = field(default_factory=dict)
    engine: EngineConfig = field(default_factory=EngineConfig)
    input: InputConfig = field(default_factory=InputConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    scores: ScoreConfig = field(default_factory=ScoreConfig)
    resources: ResourceConfig = field(default_factory=ResourceConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_flat(cls, inputs, output_dir, **options) -> "JobConfig":
        """Build from flat option names, as on the command line (``batch_size=4, steps=10, seed=1``); ``None`` means
        the default. Unknown names raise."""
        options = {k: v for k, v in options.items() if v is not None}
        edit = {k: options.pop(k) for k in FLAT_KEYS if k in options}
        configs = {}
        for name, config_cls in COMPONENTS.items():
            given = {f.name: options.pop(flag_name(f)) for f in cli_fields(config_cls) if flag_name(f) in options}
            configs[name] = config_cls(**given)
        if options:
            raise ValueError(f"unknown option(s): {', '.join(sorted(options))}")
        inputs = (inputs,) if isinstance(inputs, str) else tuple(str(i) for i in inputs)
        return cls(inputs=inputs, output_dir=str(output_dir), edit=edit, **configs)


def serialise(job: JobConfig, edit: EditConfig) -> dict:
    """run.json's sections: the resolved edit (flat keys) and every component's config."""
    return {"edit": edit.flat(), **{name: asdict(getattr(job, name)) for name in COMPONENTS}}


def identity(run: dict) -> dict:
    """The values of a run record that change rows, as ``{name: value}`` (config leaves by option name)."""
    out = {name: run.get(name) for name in DERIVED_IDENTITY}
    for section in ("edit", *COMPONENTS):
        values = run.get(section)
        out.update({k: v for k, v in (values if isinstance(values, dict) else {}).items() if k in IDENTITY})
    return out
