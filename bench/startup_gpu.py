"""Start-up of a compiled actor: seconds from its creation to its first batch, cold and with the compile cache.

    bash bench/on_gpu.sh python3 bench/startup_gpu.py [--n 32] [--out bench/results]

SD 1.5's architecture with random weights is saved as a diffusers folder; then fresh processes each build the
model as the job's actor does (``pipelines.actor._engine_model``: load, compile, compile cache) and edit two
batches of ``--n`` images at the paper's defaults, reporting the time from the process's start to the end of
its first batch (import, load, compile, first batch) and the second batch's time. Each process gets its own
empty Inductor (and Triton) cache folder unless said otherwise, as a process on another node would:
1. ``cold``: nothing cached; it writes its graphs to the shared compile cache (``--compile-cache``);
2. ``another node``: a fresh Inductor folder, the shared compile cache read;
3. ``preset fast cold`` and 4. ``preset fast another node``: the same two at --preset fast, whose split UNet
   (feature reuse) is new to the cache;
5. ``restarted``: the first process's Inductor folder, no shared cache (PyTorch's own local caches);
6. ``eager``: no compilation.
Writes ``startup_gpu_<device>.json`` under --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import add_out_argument, model_folder, result_path, write_result

HERE = Path(__file__).resolve()


def child(args) -> None:
    """One actor's start: returns (prints) its timings as JSON."""
    t_start = float(os.environ["STARTUP_T0"])
    import numpy as np
    import torch
    from PIL import Image

    from bench_gpu import run_ours
    from diffedit.pipelines.actor import _engine_model
    from diffedit.pipelines.config import PRESETS, EngineConfig
    from diffedit.stages.config import EditConfig
    from diffedit.stages.images import images_to_tensor

    t_import = time.time()
    engine = EngineConfig(model=args.model, dtype="fp16" if torch.cuda.is_available() else "fp32", compile=args.compile,
                          compile_cache=(args.compile_cache or "off") if args.compile else None)
    model, cache = _engine_model(engine, args.work)
    cached = len(cache.known) if cache else 0
    t_loaded = time.time()
    config = EditConfig().replace(**(PRESETS["fast"][1] if args.preset == "fast" else {}))
    rng = np.random.default_rng(0)
    res = model.resolution
    pil = [Image.fromarray(rng.integers(0, 256, (res, res, 3), dtype=np.uint8)) for _ in range(args.n)]
    x = images_to_tensor(pil, res).to(model.device, model.dtype)

    def batch() -> float:
        t = time.time()
        with torch.no_grad():
            run_ours(model, x, config)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        return time.time() - t

    first = batch()
    t_first = time.time()
    saved = cache.save() if cache else None
    second = batch()
    print("RESULT " + json.dumps(dict(
        import_s=t_import - t_start, load_and_cache_s=t_loaded - t_import, first_batch_s=first,
        creation_to_first_batch_s=t_first - t_start, second_batch_s=second, graphs_in_cache=cached,
        cache_written=str(saved.name) if saved else None, cache_save_s=time.time() - t_first - second)), flush=True)


def run_child(work: Path, model: Path, n: int, inductor: Path, compile: bool, cache: Path | None, preset: str | None):
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor), TRITON_CACHE_DIR=str(inductor / "triton"),
               STARTUP_T0=repr(time.time()))
    cmd = [sys.executable, str(HERE), "--child", "--model", str(model), "--work", str(work), "--n", str(n)]
    cmd += (["--compile"] if compile else []) + (["--compile-cache", str(cache)] if cache else [])
    cmd += ["--preset", preset] if preset else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return dict(error=(proc.stderr or proc.stdout)[-1500:])
    return json.loads(lines[-1][len("RESULT "):])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--work", default=None, help="model and caches (default: a temporary folder)")
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of SD 1.5 (CPU smoke run)")
    p.add_argument("--scenarios", default=None, help="comma-separated scenario names (default: all)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compile-cache", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    add_out_argument(p)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="startup-"))
    model = model_folder("tiny" if args.tiny else "sd15", work)
    cache = work / "compile-cache"
    scenarios = [  # name, Inductor folder, compile, shared cache, preset
        ("cold", work / "inductor-1", True, cache, None),
        ("another node", work / "inductor-2", True, cache, None),
        ("preset fast cold", work / "inductor-3", True, cache, "fast"),
        ("preset fast another node", work / "inductor-5", True, cache, "fast"),
        ("restarted", work / "inductor-1", True, None, None),
        ("eager", work / "inductor-4", False, None, None),
    ]
    wanted = args.scenarios.split(",") if args.scenarios else [s[0] for s in scenarios]
    rows = []
    for name, inductor, compile, shared, preset in (s for s in scenarios if s[0] in wanted):
        row = dict(scenario=name, **run_child(work, model, args.n, inductor, compile, shared, preset))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_result(result_path("startup_gpu", Path(args.out)), None, n=args.n, rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
