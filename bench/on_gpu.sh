#!/usr/bin/env bash
# Run a benchmark on a GPU machine with no internet (the device tool's): install what it lacks from the folder of
# `bash ../shared/gpu/make-wheels.sh` ($WHEELS, default .whl: every wheel there, and Ray from ray-slim.tar.xz when
# present; add braceexpand's wheel for webdataset: `pip download --no-deps -d .whl braceexpand`; a folder holding
# only diffusers' wheel is enough for bench_gpu.py) and make the repository importable as
# the `diffedit` package (the repository root is the package), then run the command.
#
#   bash bench/on_gpu.sh python3 bench/bench_gpu.py --out $OUT --compile
set -euo pipefail
wheels=${WHEELS:-.whl}
if ! python3 -c "import diffusers" 2>/dev/null; then
  site=/tmp/site && mkdir -p "$site"
  if [ -f "$wheels/ray-slim.tar.xz" ]; then tar xJf "$wheels/ray-slim.tar.xz" -C "$site"; fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "$wheels"/*.whl
  export PYTHONPATH=$site:${PYTHONPATH:-}
fi
if ! python3 -c "import diffedit" 2>/dev/null; then
  mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/diffedit && export PYTHONPATH=/tmp/pkg:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1
exec "$@"
