#!/usr/bin/env bash
# One GPU check, < 8 minutes on one H100/H200: CUDA parity tests (every kernel, fast attention paths,
# the whole model vs the fp32 CPU reference in bf16, no host sync in the sleep loop), then the benchmark
# tables (kernel speed; tokens/s, MFU, peak memory and throughput ratio vs N=1 for 350m and 1.3b at
# N = 1, 2, 4), written as markdown naming the commit.
# Installs nothing over the network. Usage: benchmarks/gpu_check.sh [OUT.md] [extra gpu_check.py args]
# Env: PYTHON (default python3 or .venv/bin/python), PYTEST_TIMEOUT (default 240 s for the tests),
# WHEELHOUSE (a folder made by launch/wheelhouse.sh: on a node whose Python has torch but not megasleep's
# other dependencies, they are installed from it, offline, into a temporary folder first).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -n "${WHEELHOUSE:-}" ]; then
  SITE=${TMPDIR:-/tmp}/megasleep-site
  echo "== dependencies from $WHEELHOUSE into $SITE =="
  "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$WHEELHOUSE"/*.whl || { echo "gpu_check: installing $WHEELHOUSE failed" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
OUTFILE=${1:-benchmarks/gpu-check-$(date +%F).md}
shift || true
echo "== CUDA parity tests (tests/gpu) =="
# + train.precision=bf16 through DeepSpeed on CUDA (dtypes after engine init, fp32 masters, the loss curve),
# the inference engine's decode through the step kernels, and mamba_ssm's own GPU model vs ours
timeout "${PYTEST_TIMEOUT:-240}" "$PY" -m pytest -q -ra -p no:cacheprovider tests/gpu \
    tests/train/test_precision_train.py tests/inference/test_cuda.py tests/checkpoint/test_mamba_ssm.py \
    -k cuda 2>&1 | tee /tmp/gpu_tests.log
test_rc=${PIPESTATUS[0]}
echo "== benchmarks =="
"$PY" benchmarks/gpu_check.py --out "$OUTFILE" "$@"
bench_rc=$?
{ echo; echo "## CUDA parity tests (exit $test_rc)"; echo; echo '```'; tail -n 25 /tmp/gpu_tests.log; echo '```'; } >> "$OUTFILE"
echo "report: $OUTFILE (tests exit $test_rc, benchmarks exit $bench_rc)"
exit $(( test_rc != 0 ? test_rc : bench_rc ))
