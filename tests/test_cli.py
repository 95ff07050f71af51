"""The command line itself: `--help` answers without importing torch, and the shapes world's subcommands come
from its entry point (pipelines/ never imports the shapes world)."""

import subprocess
import sys


def test_help_imports_no_torch_and_lists_the_shapes_commands():
    script = ("import sys\n"
              "from diffedit.pipelines.cli import build_parser\n"
              "text = build_parser().format_help()\n"
              "heavy = sorted(m for m in ('torch', 'ray', 'diffusers', 'diffedit.shapes.eval', 'diffedit.pipelines.job')"
              " if m in sys.modules)\n"
              "print(heavy, 'eval' in text and 'shapes' in text)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] True"


def test_eval_help_parses_through_the_entry_point(capsys):
    from diffedit.pipelines.cli import main

    try:
        main(["eval", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    assert "held-out" in capsys.readouterr().out
