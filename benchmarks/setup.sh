#!/usr/bin/env bash
# Builds the benchmarks' own environment, .venv-bench in the repository root:
#   1. torch==2.13.0 first (the CPU build where pip's configuration provides it), then pinned for
#      every later step, so no peer can pull another (e.g. a CUDA) torch;
#   2. the peer libraries from requirements-peers.txt ("no-deps" lines with --no-deps);
#   3. influencer itself, editable.
# Usage: bash benchmarks/setup.sh   (VENV=path to build elsewhere, PYTHON=python3.x to choose)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"
requirements="$root/benchmarks/requirements-peers.txt"

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

"${pip[@]}" "torch==2.13.0"
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==2.13.0" >"$constraints"

# Strip comments; split the "no-deps" packages from the rest.
with_deps=$(grep -v 'no-deps' "$requirements" | sed 's/#.*//' | awk 'NF')
no_deps=$(grep 'no-deps' "$requirements" | sed 's/#.*//' | awk 'NF')
# shellcheck disable=SC2086
"${pip[@]}" -c "$constraints" $with_deps
# shellcheck disable=SC2086
"${pip[@]}" -c "$constraints" --no-deps $no_deps
"${pip[@]}" -c "$constraints" -e "$root"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch

for name in ("influencer", "torch", "captum", "dattri", "pyDVL", "kronfluence", "bergson", "mnist1d"):
    print(f"{name:12s} {md.version(name)}")
print(f"torch CUDA build: {torch.version.cuda or 'none (CPU)'}")
for banned in ("torchvision", "torchaudio"):
    try:
        md.version(banned)
    except md.PackageNotFoundError:
        continue
    raise SystemExit(f"{banned} got installed; no peer needs it: rebuild the environment")
PY
echo "ready: $venv/bin/python benchmarks/bench_estimators.py --quick"
