#!/usr/bin/env bash
# Fill .whl/ with the wheels a GPU machine without network lacks, for its Python 3.12 on manylinux x86_64, so that
# `python3 launch/gpu_check.py --install .whl` can install them there offline. Every version is pinned and every
# dependency named (pip resolves none: --no-deps), so what travels is exactly this list.
#
#   bash launch/gpu_wheels.sh            # run here (needs the package index), from any directory
#
# The machine's image has torch, triton, torchvision, timm, accelerate, numpy, pyyaml, tqdm, tensorboard,
# matplotlib, safetensors, scikit-learn, pillow, einops, msgpack, ninja, psutil, py-cpuinfo and packaging; it lacks
# deepspeed and webdataset and these needs of theirs: hjson, pydantic (+ pydantic-core, annotated-types,
# typing-inspection; typing-extensions >= 4.16 for pydantic-core), braceexpand.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DEST=.whl
MAX_MIB=32  # what travels to the machine is capped at 64 MiB per call, working tree included

BINARY=(  # name==version, downloaded as wheels for CPython 3.12 manylinux x86_64
  hjson==3.1.0
  pydantic==2.14.4
  pydantic-core==2.50.5
  annotated-types==0.8.0
  typing-inspection==0.4.5
  typing-extensions==4.16.0
  webdataset==1.0.2
  braceexpand==0.1.7
)
SDIST=deepspeed==0.19.8  # only an sdist on the index: built here into a pure-Python wheel without compiled ops

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two versions of one package stop the whole install

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${BINARY[@]}"

# DS_BUILD_OPS=0: no C++/CUDA op is compiled into the wheel (ops JIT-build on use; training here uses none);
# DeepSpeed picks its accelerator (CUDA) when imported, not from the machine that built the wheel.
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$SDIST"

"$PY" - "$DEST" "$MAX_MIB" "${BINARY[@]}" "$SDIST" <<'EOF'
"""One wheel per pinned name, each pure Python or built for CPython 3.12 x86_64; print sizes and the total."""
import re
import sys
from pathlib import Path

dest, max_mib, wanted = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
wheels = sorted(dest.glob("*.whl"))
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()  # noqa: E731
found = {norm(w.name.split("-")[0]) + "==" + w.name.split("-")[1]: w for w in wheels}
missing = [spec for spec in wanted if norm(spec.split("==")[0]) + "==" + spec.split("==")[1] not in found]
foreign = [w.name for w in wheels
           if not (w.name.endswith("-none-any.whl") or "-cp312-" in w.name and "x86_64" in w.name)]
total = sum(w.stat().st_size for w in wheels)
for w in wheels:
    print(f"{w.stat().st_size / 2**20:8.2f} MiB  {w.name}")
print(f"{total / 2**20:8.2f} MiB  total, {len(wheels)} wheels in {dest}/ (limit {max_mib:g} MiB)")
if missing or foreign or len(wheels) != len(wanted) or total > max_mib * 2**20:
    sys.exit(f"error: missing {missing}, not for cp312 x86_64 {foreign}, {len(wheels)} wheels for "
             f"{len(wanted)} names, {total / 2**20:.1f} MiB")
EOF
