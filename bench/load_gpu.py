"""Where an actor's model load goes: each component's ``from_pretrained`` and its move to the GPU, in a fresh process.

    bash bench/on_gpu.sh python3 bench/load_gpu.py [--work DIR] [--out bench/results]

SD 1.5's architecture with random fp16 weights is saved as a diffusers folder (bench/harness.py) once; then a
fresh process imports torch, initialises CUDA and loads the folder twice: as ``stages.model.load_model`` does
(each component to the CPU in fp16, then ``.to(device)``), and each component with ``device_map`` (safetensors
read straight onto the GPU). Writes ``load_gpu_<device>.json`` under --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import add_out_argument, model_folder, result_path, write_result

CHILD = """
import importlib, json, sys, time
t0 = time.time()
import torch
import diffusers, transformers
t_import = time.time()
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.zeros(1, device=device); torch.cuda.synchronize() if device.type == "cuda" else None
t_cuda = time.time()
folder, way = sys.argv[1], sys.argv[2]
index = json.load(open(folder + "/model_index.json"))
row = dict(way=way, import_s=t_import - t0, device_init_s=t_cuda - t_import)
for part, spec in index.items():
    if part.startswith("_") or not isinstance(spec, list) or spec[0] is None or "Scheduler" in spec[1]:
        continue
    library, name = spec
    cls = getattr(importlib.import_module(library), name)
    t = time.time()
    if "Tokenizer" in name:
        cls.from_pretrained(folder, subfolder=part)
        row[part + "_s"] = time.time() - t
        continue
    dtype_arg = "torch_dtype" if library == "diffusers" else "dtype"
    kw = {dtype_arg: torch.float16 if device.type == "cuda" else torch.float32, "use_safetensors": True}
    if way == "device_map":
        module = cls.from_pretrained(folder, subfolder=part, device_map=str(device), **kw)
    else:
        module = cls.from_pretrained(folder, subfolder=part, **kw)
        row[part + "_read_s"] = time.time() - t
        module.to(device)
    torch.cuda.synchronize() if device.type == "cuda" else None
    row[part + "_s"] = time.time() - t
row["total_s"] = time.time() - t0
print(json.dumps(row))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/load_gpu"), help="where the model folder is saved")
    p.add_argument("--kind", default="sd15", help="sd15, or tiny for a CPU smoke run")
    add_out_argument(p)
    args = p.parse_args(argv)
    folder = model_folder(args.kind, args.work)
    rows = []
    for way in ("cpu_then_move", "device_map", "cpu_then_move"):  # the first read may warm the page cache
        t = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD, str(folder), way], capture_output=True, text=True)
        if out.returncode:
            rows.append(dict(way=way, error=out.stderr[-1500:]))
        else:
            rows.append(dict(json.loads(out.stdout.strip().splitlines()[-1]), process_s=time.time() - t))
        print(json.dumps(rows[-1]), flush=True)
    device = "cuda" if _has_cuda() else "cpu"
    write_result(result_path("load_gpu", args.out, device), device, rows=rows)
    return 0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
