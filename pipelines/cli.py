"""The `diffedit` command: run, status, export, gallery, shapes, eval. Parse, build, run.

Edit options default to None, meaning "the model folder's diffedit.json, else the paper's value".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from importlib.metadata import entry_points

EDIT_OPTIONS = [
    # (flag, type, help) — the flat keys of diffedit.stages.config.EditConfig
    ("--steps", int, "DDIM steps of the full schedule, T (paper: 50)"),
    ("--encode-ratio", float, "encoding ratio r: DDIM-encode int(T*r) steps (paper: 0.8)"),
    ("--mask-samples", int, "noise samples n averaged for the mask (paper: 10)"),
    ("--mask-strength", float, "noise strength for mask inference (paper: 0.5)"),
    ("--clip-ratio", float, "mask map values above this x the image's mean are clipped (default 3.0)"),
    ("--threshold", float, "binarisation threshold of the [0, 1] mask map (paper: 0.5; the shipped model recommends 0.75)"),
    ("--guidance", float, "classifier-free guidance scale for decoding (paper: 7.5)"),
    ("--negative-prompt", str, "negative (unconditional) text of guidance during decoding (default: empty)"),
    ("--encode-guidance", float, "guidance during conditional encoding (default 1; diffusers' pipeline uses 7.5)"),
    ("--encode-method", str, "ddim (the paper's encoding) or noise (its ablation: plain noising, as SDEdit) (default ddim)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffedit", description="DiffEdit over whole image datasets, on Ray Data.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="edit WebDataset shards into a resumable Parquet manifest",
                         description="Edit every sample of the shards (DiffEdit: mask inference, DDIM encoding, masked "
                                     "DDIM decoding). Rerunning the same command on the same --output resumes it.")
    run.add_argument("inputs", nargs="+", metavar="INPUT",
                     help="WebDataset shards: paths, globs, brace patterns (shard-{000000..000099}.tar) or s3://... URLs")
    run.add_argument("--output", "-o", required=True, help="output folder (manifest/, run.json)")
    run.add_argument("--model", help="diffusers model folder or hub id (default: the shipped shapes model)")
    run.add_argument("--prompts", help="YAML/JSON rules, labels or pair table (.parquet/.csv/.jsonl); "
                                       "default: colour and shape swaps (red<->blue, circle<->square, ...)")
    for flag, typ, help_ in EDIT_OPTIONS:
        run.add_argument(flag, type=typ, help=help_)
    run.add_argument("--conditional-encoding", action="store_true", default=None,
                     help="encode under the source prompt instead of unconditionally (the paper's choice)")
    run.add_argument("--seed", type=int, default=0, help="global seed; each edit's noise comes from (seed, key, edit)")
    run.add_argument("--samples-per-edit", type=int, default=1, metavar="K",
                     help="best-of-k: edit each (sample, edit) with K seeds, one row each (sample_index 0..K-1), and "
                          "mark the best by --best-by in the `best` column (default 1)")
    run.add_argument("--best-by", default="clip_directional", metavar="SCORE",
                     help="the score that picks the best of K samples: higher is better, except lpips (lower); "
                          "table in manifests/best.py (default clip_directional)")
    run.add_argument("--batch-size", type=int, default=8, help="images per actor batch (default 8; 32 on a 24 GB GPU at SD 1.5 scale)")
    run.add_argument("--num-gpus", type=int, help="number of GPU actors (default: every GPU in the cluster)")
    run.add_argument("--gpus-per-actor", type=float, default=1.0, help="GPUs per actor (0.5 puts two actors on a GPU)")
    run.add_argument("--cpu-actors", type=int, default=1, help="actors when the cluster has no GPU (default 1)")
    run.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                     help="model dtype (auto: fp16 on CUDA, fp32 on CPU)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                     help="where actors run the model (auto: CUDA if the actor sees one); cpu also stops GPU scheduling")
    run.add_argument("--limit", type=int, help="edit only the first N samples")
    run.add_argument("--overwrite", action="store_true", help="delete an existing job in --output and start again")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a new local Ray)")
    run.add_argument("--caption-field", default="txt",
                     help="'txt' (the txt member, else json's 'caption'), or a field name of the json member")
    run.add_argument("--image-format", default="png", choices=["png", "jpeg"], help="format of the edited images")
    run.add_argument("--save-latents", action="store_true", help="store the edited latents in the manifest")
    run.add_argument("--max-pixels", type=int, default=64_000_000, help="refuse larger images (decompression bombs)")
    run.add_argument("--max-member-bytes", type=int, default=256 * 2**20,
                     help="refuse tar members larger than this, before reading them (default 256 MiB)")
    run.add_argument("--retry-errors", action=argparse.BooleanOptionalAction, default=True,
                     help="a rerun edits again the edits that have error rows (default; --no-retry-errors keeps them)")
    run.add_argument("--verbose", "-v", action="store_true", help="show Ray's own log lines (hidden by default)")
    run.add_argument("--progress-seconds", type=float,
                     help="seconds between progress lines on stderr (default: 1, rewritten in place, on a terminal; 15 in a log)")
    run.add_argument("--max-batch", type=int, default=64, help="cap on one UNet call's batch (bounds GPU memory)")
    run.add_argument("--no-scores", dest="scores", action="store_false",
                     help="skip the quality scores (CLIP, directional CLIP, LPIPS, background PSNR/SSIM)")
    run.add_argument("--clip-model", help="open_clip architecture name or model folder (default: the shipped shapes CLIP)")
    run.add_argument("--clip-weights", help="local CLIP checkpoint (.safetensors) for --clip-model")
    run.add_argument("--lpips-weights", help="LPIPS backbone weights (torchvision); default: torch hub's cache, else null")
    run.add_argument("--rows-per-part", type=int, default=256, help="rows per committed Parquet part (the unit of resume)")
    run.add_argument("--compile", action="store_true", help="torch.compile the UNet and the VAE in each actor (GPU; ~1.5 min start)")
    run.set_defaults(func=_run)

    st = sub.add_parser("status", help="counts by status, score distribution, what is left")
    st.add_argument("output")
    st.set_defaults(func=_status)

    ex = sub.add_parser("export", help="kept edits as WebDataset shards for training")
    ex.add_argument("output")
    ex.add_argument("--to", required=True, help="folder for the shards")
    ex.add_argument("--where", help='filter over the manifest\'s columns (README: Export filters), e.g. '
                                         '"clip_directional >= 0.2 and clip_image >= 0.7" or "best and ..."')
    ex.add_argument("--overwrite", action="store_true",
                    help="replace a previous export in --to (its edits-*.tar and export.json; never other files)")
    ex.add_argument("--best-only", action="store_true",
                    help="only the best sample of each edit (--samples-per-edit K > 1); default: every ok row")
    ex.set_defaults(func=_export)

    ga = sub.add_parser("gallery", help="a self-contained HTML page of the edits")
    ga.add_argument("output")
    ga.add_argument("--html", help="where to write it (default OUT/gallery.html)")
    ga.set_defaults(func=_gallery)

    for command in entry_points(group="diffedit.commands"):  # the shapes world's `shapes` and `eval` (shapes/cli.py)
        command.load()(sub, EDIT_OPTIONS)
    return parser


def _run(args) -> int:
    from ..stages.config import FLAT_KEYS
    from .job import JobOptions, run_job

    edit = {k: getattr(args, k) for k in FLAT_KEYS if getattr(args, k, None) is not None}
    fields = {k: v for k, v in vars(args).items() if k in JobOptions.__dataclass_fields__}
    run_job(JobOptions(**fields, edit=edit))
    return 0


def _status(args) -> int:
    from ..manifests.export import status

    print(json.dumps(status(args.output), indent=1))
    return 0


def _export(args) -> int:
    from ..manifests.export import export

    print(json.dumps(export(args.output, args.to, args.where, best_only=args.best_only, overwrite=args.overwrite)))
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
        if not isinstance(inner, BaseException) or type(exc).__module__.split(".")[0] != "ray":
            break
        exc = inner
    return exc


def _one_line(exc: BaseException) -> str:
    """An exception as one line: its message's first line (Ray wraps worker errors in many lines)."""
    exc = _root_cause(exc)
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip() or type(exc).__name__
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
