"""The `diffedit` command: run, status, export, gallery, shapes, eval. Parse, build, run.

`run`'s flags are generated from the job's typed configs (pipelines/config.py, stages/config.py): an option is
declared once, on its config field. Every flag defaults to None, meaning "the config's default" (for edit
parameters: the model folder's diffedit.json, else the paper's value).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import typing
from importlib.metadata import entry_points


def _flag_type(hint):
    """The argparse type of a config field's annotation (``int | None`` -> int)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


_METAVAR = {int: "N", float: "X"}


def _default_text(f) -> str:
    if f.default is None or isinstance(f.default, bool) or "default" in f.metadata["help"]:
        return ""
    return f" (default {f.default:,})" if isinstance(f.default, int) else f" (default {f.default})"


def add_config_flags(parser, config_cls, *, edit: bool = False, only: tuple[str, ...] | None = None) -> list[str]:
    """Add a flag per command-line field of ``config_cls`` (``stages.config.option``; those named in ``only``, if
    given); returns their names. Flags default to None, meaning the config's own default (for edit parameters: the
    model's diffedit.json, else the paper's), so defaults live in the configs only."""
    from ..stages.config import flag_name
    from .config import cli_fields

    hints, names = typing.get_type_hints(config_cls), []
    for f in (f for f in cli_fields(config_cls) if only is None or flag_name(f) in only):
        name, kind = flag_name(f), _flag_type(hints[f.name])
        flags, help_ = ["--" + name.replace("_", "-"), *f.metadata.get("aliases", ())], f.metadata["help"]
        if edit:
            help_ += f" (default: the model's diffedit.json, else {f.default!r})"
        if kind is bool and f.default:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=help_ + " (default)")
        elif kind is bool:
            parser.add_argument(*flags, action="store_true", default=None, help=help_)
        else:
            parser.add_argument(*flags, type=kind, default=None, choices=f.metadata["choices"], metavar=_METAVAR.get(kind),
                                help=help_ + ("" if edit else _default_text(f)))
        names.append(name)
    return names


def add_edit_flags(parser) -> list[str]:
    """The edit parameters' flags (stages.config), shared by `run` and `eval`."""
    from ..stages.config import STEPS

    return [name for cls in STEPS.values() for name in add_config_flags(parser, cls, edit=True)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffedit", description="DiffEdit over whole image datasets, on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)

    st = sub.add_parser("status", help="counts by status, score distribution, what is left")
    st.add_argument("output")
    st.set_defaults(func=_status)

    ex = sub.add_parser("export", help="kept edits as training pairs (source, edit, mask, prompts, json)",
                        description="Write every kept edit as a training pair: WebDataset shards or Parquet files "
                                    "(README: Export).")
    ex.add_argument("output")
    ex.add_argument("--to", required=True, help="folder for the shards or files")
    ex.add_argument("--format", choices=("webdataset", "parquet"), default="webdataset",
                    help="webdataset: edits-NNNNNN.tar shards (default); parquet: pairs-NNNNN.parquet with "
                         "InstructPix2Pix's columns (input_image, edit_prompt, edited_image) as datasets Images")
    ex.add_argument("--where", help='filter over the manifest\'s columns (README: Export filters), e.g. '
                                         '"clip_directional >= 0.2 and clip_image >= 0.7" or "best and ..."')
    ex.add_argument("--best-only", action="store_true",
                    help="only the best sample of each edit (--samples-per-edit K > 1); default: every ok row")
    ex.add_argument("--per-file", type=int, default=10_000, metavar="N", help="at most N pairs a shard or file "
                                                                              "(default 10,000)")
    ex.add_argument("--max-mb", type=_megabytes, default=1024, metavar="MB",
                    help="start a new shard or file past about MB megabytes (default 1024)")
    ex.add_argument("--overwrite", action="store_true", help="replace a previous export in --to (its edits-*.tar, "
                                                             "pairs-*.parquet and export.json; never other files)")
    ex.set_defaults(func=_export)

    ga = sub.add_parser("gallery", help="a self-contained HTML page of the edits")
    ga.add_argument("output")
    ga.add_argument("--html", help="where to write it (default OUT/gallery.html)")
    ga.set_defaults(func=_gallery)

    for command in entry_points(group="diffedit.commands"):  # the shapes world's `shapes` and `eval` (shapes/cli.py)
        command.load()(sub, add_edit_flags)
    return parser


def _add_run(sub) -> None:
    """`diffedit run`: its flags generated from the job's configs, one argument group per config."""
    from .config import COMPONENTS

    run = sub.add_parser("run", help="edit WebDataset shards into a resumable Parquet manifest",
                         description="Edit every sample of the shards (DiffEdit: mask inference, DDIM encoding, masked "
                                     "DDIM decoding). Rerunning the same command on the same --output resumes it.")
    run.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="WebDataset shards: paths, globs, brace patterns (shard-{000000..000099}.tar) or s3://... URLs")
    run.add_argument("--output", "-o", dest="output_dir", metavar="OUT", required=True,
                     help="output folder (manifest/, run.json)")
    flags = add_edit_flags(run.add_argument_group("edit", "The three DiffEdit steps (stages/config.py)."))
    for name, config_cls in COMPONENTS.items():
        flags += add_config_flags(run.add_argument_group(name, config_cls.__doc__.splitlines()[0]), config_cls)
    run.set_defaults(func=_run, job_flags=flags)


def _run(args) -> int:
    from .config import JobConfig
    from .job import run_job

    options = {name: getattr(args, name) for name in args.job_flags}
    run_job(JobConfig.from_flat(args.inputs, args.output_dir, **options))
    return 0


def _status(args) -> int:
    from ..manifests.export import status

    print(json.dumps(status(args.output), indent=1))
    return 0


def _megabytes(text: str) -> float:
    """``--max-mb``: a positive, finite number of megabytes."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 2**40:
        raise argparse.ArgumentTypeError(f"{text} is not a size in MB (a number > 0)")
    return value


def _export(args) -> int:
    from ..manifests.export import export

    print(json.dumps(export(args.output, args.to, args.where, best_only=args.best_only, format=args.format,
                            max_pairs=args.per_file, max_bytes=int(args.max_mb * 2**20), overwrite=args.overwrite)))
    return 0


def _gallery(args) -> int:
    from ..manifests.gallery import write_gallery

    print(write_gallery(args.output, args.html))
    return 0


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrappers (RayTaskError, UserCodeException)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if (not isinstance(inner, BaseException) or type(exc).__module__.split(".")[0] != "ray"
                or type(inner).__name__ == "SystemException"):  # Ray Data's marker of its own frames: no message
            break
        exc = inner
    return exc


_RAISED = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")


def _raised_line(text: str) -> str:
    """The last ``SomeError: message`` line of a traceback's text (Ray keeps a dead actor's error only as text)."""
    lines = [f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()}" for m in map(_RAISED.match, text.splitlines()) if m]
    return lines[-1][:400] if lines else text.splitlines()[0]


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line (Ray wraps worker errors in many lines)."""
    exc = _root_cause(exc)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip() or type(exc).__name__
    if type(exc).__name__ == "ActorDiedError" and "creation task" in text:
        return "an edit actor could not start: " + _raised_line(text.split("creation task", 1)[1])
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else text
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in first:
        first += f": {exc.filename}"
    return first if isinstance(exc, (FileNotFoundError, ValueError, RuntimeError)) else f"{type(exc).__name__}: {first}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `diffedit status OUT | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print(f"diffedit {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure a user can cause: one line, non-zero exit
        if os.environ.get("DIFFEDIT_TRACEBACK"):
            raise
        print(f"diffedit {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
