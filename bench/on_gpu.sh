#!/usr/bin/env bash
# Run a benchmark on a GPU machine that has PyTorch but no internet: install what it lacks from a folder of
# wheels, make the repository importable as the `diffedit` package (the repository root is the package), then
# run the command.
#
#   WHEELS=DIR bash bench/on_gpu.sh python3 bench/bench_gpu.py --compile
#
# DIR (default .whl) holds wheels for the packages the GPU machine lacks, made beforehand on a machine with
# internet with `pip download --no-deps -d DIR PACKAGE==VERSION` (or `pip wheel --no-deps -w DIR` for a package
# published without a wheel), at the versions pyproject.toml pins. bench_gpu.py needs only diffusers; the job's
# benchmarks also need ray, webdataset and braceexpand (webdataset's dependency), and with scores open_clip_torch
# and lpips (and ftfy, wcwidth). For a package with compiled code (ray), add `--only-binary=:all:
# --platform manylinux2014_x86_64 --python-version X.Y` for the GPU machine's Python. A `*.tar.xz` in DIR is
# unpacked into the same install folder first: a site-packages tree packed ahead, for packages installed there
# another way. Nothing is installed when the machine already imports diffusers.
set -euo pipefail
wheels=${WHEELS:-.whl}
if ! python3 -c "import diffusers" 2>/dev/null; then
  site=/tmp/site && mkdir -p "$site"
  for packed in "$wheels"/*.tar.xz; do
    if [ -f "$packed" ]; then tar xJf "$packed" -C "$site"; fi
  done
  files=("$wheels"/*.whl)
  if [ -f "${files[0]}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${files[@]}"
  fi
  export PYTHONPATH=$site:${PYTHONPATH:-}
fi
if ! python3 -c "import diffedit" 2>/dev/null; then
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/diffedit && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
exec "$@"
