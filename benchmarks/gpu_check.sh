#!/usr/bin/env bash
# The GPU checks, in a few minutes on a machine with one CUDA device:
#   1. the environment (GPU, driver, torch and its CUDA build) -> env.txt
#   2. every test that needs CUDA (they skip without it): `pytest -k cuda` over the test files that
#      have them -> pytest.txt, pytest.xml
#   3. one row of the scaling grid on the GPU: the Kronecker 24 x 24 store at p = 992,266,
#      n = 50,000, top-10 for 1,000 test examples, in epochs of training, with full-precision and
#      with bfloat16 Fisher and score products -> scaling.json, scaling.txt
# Results go to $OUT when it is set (the device runner brings that folder back), else out/gpu_check.
# Without CUDA it is a dry run: the CUDA tests report as skipped and the scaling row runs a small
# CPU cell (n = 1,000, p = 1,098), so the script itself is checked anywhere.
# Usage: bash benchmarks/gpu_check.sh        (PYTHON=path/to/python to choose the interpreter;
#        SCALING_TIMEOUT=seconds for the scaling row, default 300)
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/out/gpu_check}"
mkdir -p "$out"
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
else
    python="python3"
fi
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
export OMP_WAIT_POLICY=PASSIVE
status=0

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "load: $(uptime)"
    echo "git: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "python: $python"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
        || echo "nvidia-smi: not available"
    "$python" - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device 0: {torch.cuda.get_device_name(0)}")
EOF
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
if ! "$python" -c "import torch" 2>/dev/null; then
    echo "gpu_check: $python cannot import torch; set PYTHON to an interpreter with torch installed" >&2
    exit 2
fi
cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")

# 1. The CUDA tests: every test whose name says cuda, in the files that have one.
files=$(grep -l "cuda" tests/test_*.py | tr '\n' ' ')
echo "== pytest -k cuda: $files"
# shellcheck disable=SC2086
"$python" -m pytest -q -rs -k cuda --junitxml="$out/pytest.xml" $files 2>&1 | tee "$out/pytest.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

# 2. One scaling row (fresh processes; bench_scaling prints its table and writes JSON).
if [[ "$cuda" == "1" ]]; then
    row=(--device cuda --n 50000 --p 1000000 --methods index-kron24,index-kron24-bf16 --test 1000 --budget-s 600)
else
    echo "== no CUDA device: dry run of the scaling row on the CPU at n = 1,000, p = 1,098"
    row=(--device cpu --threads 1 --n 1000 --p 1000 --methods index-kron24,index-kron24-bf16 --test 20 --quick)
fi
echo "== bench_scaling.py ${row[*]}"
timeout "${SCALING_TIMEOUT:-300}" "$python" benchmarks/bench_scaling.py "${row[@]}" --json "$out/scaling.json" \
    2>&1 | tee "$out/scaling.txt"
[[ ${PIPESTATUS[0]} -eq 0 ]] || status=1

echo "== gpu_check: exit $status (cuda=$cuda); results in $out"
exit $status
