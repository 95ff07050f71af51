"""The shapes world's subcommands of `diffedit` (`shapes generate`, `eval`), registered through the entry-point
group ``diffedit.commands`` (pyproject.toml), so that `pipelines/` never imports the shapes world. Parsing needs
only ``scenes`` (NumPy and PIL): the evaluation and torch load when `eval` runs, so `diffedit --help` is fast.
"""

from __future__ import annotations

from . import scenes


def register(subparsers, add_edit_flags) -> None:
    """Add ``shapes generate`` and ``eval`` to the `diffedit` command; ``add_edit_flags(parser)`` adds run's edit
    flags to a parser."""
    shapes = subparsers.add_parser("shapes", help="the shapes world: a benchmark with ground truth")
    scenes.add_cli(shapes.add_subparsers(dest="shapes_command", required=True))
    _add_eval(subparsers, add_edit_flags)


def _add_eval(subparsers, add_edit_flags) -> None:
    """Register ``eval`` on the `diffedit` command's subparsers, with run's edit flags."""
    p = subparsers.add_parser(
        "eval", help="edit quality on held-out shapes scenes (JSON on stdout)",
        description="Generate held-out one-object scenes of the shapes world (seeds below "
                    f"{scenes.TRAIN_SEED_MIN:,}: never seen in training), run the real job on them with a colour and a "
                    "shape swap per scene, judge every edit against the ground truth and print JSON: mask_iou, "
                    "color_success, shape_success, psnr_bg, psnr_bg4, their VAE ceilings, mask_iou_ceiling, n, a "
                    "breakdown by edit kind, the parameters used and the judges. docs/QUALITY.md explains the metrics.")
    p.add_argument("--n", type=int, default=64, help="held-out one-object scenes (default 64; two edits each)")
    p.add_argument("--model", help="diffusers model folder (default: the shipped shapes model)")
    p.add_argument("--seed", type=int, default=scenes.EVAL_SEED, help="scene seed, below 1,000,000 (default 0)")
    p.add_argument("--edit-seed", type=int, default=0, help="the job's --seed: each edit's noise (default 0)")
    p.add_argument("--out", help="work folder: shards/, rules.json, job/ (the manifest), eval.json (default: a temp folder)")
    p.add_argument("--batch-size", type=int, default=8, help="images per actor batch (default 8)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the job's actor runs")
    p.add_argument("--overwrite", action="store_true", help="restart a job already in --out with other parameters")
    p.add_argument("--rows", action="store_true", help="also print every edit's metrics (key 'rows')")
    add_edit_flags(p)
    _add_job_flags(p)
    p.set_defaults(func=_eval)


# The job options `eval` passes through to its job, besides the edit parameters: how the engine runs, the preset.
EVAL_JOB_FLAGS = ("fp8", "compile", "compile_mode", "compile_cache", "preset")


def _add_job_flags(parser) -> None:
    from ..pipelines.cli import add_config_flags
    from ..pipelines.config import EngineConfig, RunConfig

    for config_cls in (EngineConfig, RunConfig):
        add_config_flags(parser, config_cls, only=EVAL_JOB_FLAGS)



def _eval(args) -> int:
    from .eval import cli

    return cli(args)
