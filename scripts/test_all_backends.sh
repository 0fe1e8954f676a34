#!/usr/bin/env bash
# Install the test dependencies into .venv (once); build the documentation strictly
# (mkdocs build --strict) and build, check and install the wheel (scripts/check_package.sh),
# once; then run the whole suite (every code block of README.md and docs/ included:
# tests/test_docs_snippets.py), then the docstring examples (pytest --doctest-modules
# keras_infini), on TensorFlow, JAX and PyTorch. Exits non-zero if any step fails.
# Usage: bash scripts/test_all_backends.sh [extra pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv || exit 1
fi
.venv/bin/pip install -q -r requirements-test.txt -e . || exit 1
# keras-hub without its dependencies (see requirements-test.txt): keeps one TensorFlow.
.venv/bin/pip install -q --no-deps "keras-hub==0.32.0" || exit 1
status=0
echo "=== documentation: mkdocs build --strict ==="
NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --quiet --site-dir site
rc=$?
echo "=== documentation: exit $rc ==="
[[ $rc -ne 0 ]] && status=1
echo "=== package: build, twine check, install the wheel in a fresh environment ==="
bash scripts/check_package.sh .venv/bin/python
rc=$?
echo "=== package: exit $rc ==="
[[ $rc -ne 0 ]] && status=1
# XLA (JAX, and TensorFlow's jit_compile) compiles every op at its lowest LLVM optimisation
# level: the suite's time is mostly compilation of small programs, ~20% less on JAX. The
# numbers computed are the same function; benchmarks run without this flag.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
for backend in jax tensorflow torch; do
  echo "=== KERAS_BACKEND=$backend ==="
  start=$(date +%s)
  # Two pytest-xdist workers, whole files per worker (module fixtures stay shared);
  # PYTEST_WORKERS=0 runs in one process.
  KERAS_BACKEND=$backend .venv/bin/python -m pytest tests -q -p no:cacheprovider \
    -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
  rc=$?
  echo "=== $backend: exit $rc in $(( $(date +%s) - start )) s ==="
  [[ $rc -ne 0 ]] && status=1
  KERAS_BACKEND=$backend .venv/bin/python -m pytest --doctest-modules keras_infini -q \
    -p no:cacheprovider
  rc=$?
  echo "=== $backend doctests: exit $rc ==="
  [[ $rc -ne 0 ]] && status=1
done
exit $status
