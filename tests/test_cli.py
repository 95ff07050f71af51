"""The command line itself: `--help` answers without importing torch, and the shapes world's subcommands come
from its entry point (pipelines/ never imports the shapes world)."""

import subprocess
import sys


def fresh_python(*lines: str, heavy: tuple[str, ...]) -> str:
    """Run ``lines`` in a new interpreter, then print which of the ``heavy`` modules it imported; its stdout."""
    script = "\n".join(["import sys", *lines, f"print(sorted(m for m in {heavy!r} if m in sys.modules))"])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_help_imports_no_torch_and_lists_the_shapes_commands():
    out = fresh_python("from diffedit.pipelines.cli import build_parser",
                       "text = build_parser().format_help()",
                       "print('eval' in text and 'shapes' in text)",
                       heavy=("torch", "ray", "diffusers", "diffedit.shapes.eval", "diffedit.pipelines.job"))
    assert out.splitlines() == ["True", "[]"]


def test_eval_help_parses_through_the_entry_point(capsys):
    from diffedit.pipelines.cli import main

    try:
        main(["eval", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "held-out" in capsys.readouterr().out


def run_args(argv: list[str]):
    from diffedit.pipelines.cli import build_parser

    return build_parser().parse_args(["run", "shard.tar", "--output", "out", *argv])


def test_run_flags_are_generated_from_the_configs_fields():
    """Every command-line field of every config is a flag of `run`, with its help; flags default to None so that
    the configs' own defaults apply; and the namespace builds the job's config."""
    from dataclasses import fields

    from diffedit.pipelines.config import COMPONENTS, JobConfig, cli_fields
    from diffedit.pipelines.cli import build_parser
    from diffedit.stages.config import STEPS, flag_name

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    actions = {a.dest: a for a in run._actions}
    for cls in [*STEPS.values(), *COMPONENTS.values()]:
        for f in cli_fields(cls):
            action = actions[flag_name(f)]
            assert action.default is None and f.metadata["help"] in action.help, (cls.__name__, f.name)
    job_fields = {flag_name(f) for cls in COMPONENTS.values() for f in fields(cls) if "help" in f.metadata}
    assert set(run_args([]).job_flags) == job_fields | {flag_name(f) for c in STEPS.values() for f in fields(c)}

    args = run_args(["--guidance", "5", "--batch-size", "3", "--no-scores", "--clip-model", "ViT-B-32",
                     "--conditional-encoding", "--encode-guidance", "2", "--no-retry-errors", "--seed", "7"])
    job = JobConfig.from_flat(args.inputs, args.output_dir, **{n: getattr(args, n) for n in args.job_flags})
    assert job.edit == {"guidance": 5.0, "conditional_encoding": True, "encode_guidance": 2.0}
    assert (job.resources.batch_size, job.output.scores, job.scores.clip_model) == (3, False, "ViT-B-32")
    assert (job.run.retry_errors, job.sampling.seed, job.engine.max_batch) == (False, 7, 64)  # 64: the default


def test_job_config_refuses_unknown_and_invalid_options():
    import pytest

    from diffedit.pipelines.config import JobConfig

    with pytest.raises(ValueError, match="unknown option.*rows_per_part"):
        JobConfig.from_flat(["a.tar"], "out", rows_per_part=2)
    for bad, message in [(dict(batch_size=0), "--batch-size"), (dict(limit=0), "--limit"),
                         (dict(samples_per_edit=0), "--samples-per-edit"), (dict(best_by="nope"), "--best-by"),
                         (dict(max_batch=0), "--max-batch"), (dict(gpus_per_actor=0), "--gpus-per-actor")]:
        with pytest.raises(ValueError, match=message):
            JobConfig.from_flat(["a.tar"], "out", **bad)


def test_the_driver_plans_a_job_without_importing_torch(tmp_path):
    """The driver describes the model and the scorers from their files: planning a job (the shipped model and
    CLIP, scores on) imports no torch, so a head node without a GPU holds no model and no torch."""
    from pathlib import Path

    samples = Path(__file__).resolve().parents[1] / "samples"
    out = fresh_python("from diffedit.pipelines.config import JobConfig",
                       "from diffedit.pipelines.job import plan_job",
                       f"job = JobConfig.from_flat([{str(samples / '*.tar')!r}], {str(tmp_path / 'out')!r})",
                       "plan = plan_job(job, lambda *a: None)",
                       "print(plan.run['scorers']['clip'] is not None, len(plan.run['model_fingerprint']))",
                       heavy=("torch", "diffusers", "open_clip", "lpips"))
    assert out.splitlines() == ["True 64", "[]"]
