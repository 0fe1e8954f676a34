#!/usr/bin/env bash
# Packaging check (run once by scripts/test_all_backends.sh): build the sdist and wheel,
# `twine check --strict` them, check what the wheel ships, then install the wheel into a
# fresh virtual environment and import it there (from outside the repository, so the
# installed copy is the one imported).
# Usage: bash scripts/check_package.sh [python]   (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
rm -rf dist build
# No build isolation: the pinned setuptools of requirements-test.txt (>= 77, SPDX license).
"$PY" -m build --no-isolation --outdir dist . > /dev/null
"$PY" -m twine check --strict dist/*
wheel=$(ls dist/*.whl)
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if n.endswith("conftest.py") or n.startswith(("tests/", "docs/"))]
assert not bad, f"the wheel ships {bad}"
assert "keras_infini/__init__.py" in names and "keras_infini/models/__init__.py" in names
meta = next(n for n in names if n.endswith("METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
for field in ("License-Expression: MIT", "Classifier:", "Keywords:", "Project-URL:",
              'keras-hub<0.33,>=0.32; extra == "hub"'):
    assert field in text, f"METADATA lacks {field!r}"
print(f"{sys.argv[1]}: {len(names)} files, metadata fields present")
PYEOF
# A fresh environment with the wheel alone (--no-deps); its dependencies (keras, numpy and
# the backends) come from this environment's site-packages through a .pth file, so nothing
# is downloaded. The editable install of the checkout is not visible there.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv --without-pip "$tmp/venv"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
fresh=$("$tmp/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
"$PY" -m pip install -q --no-deps --target "$fresh" "$wheel"
echo "$site" > "$fresh/zz_deps.pth"
(cd "$tmp" && KERAS_BACKEND=${KERAS_BACKEND:-jax} "$tmp/venv/bin/python" -c "
import keras_infini, sys
assert keras_infini.__file__.startswith(sys.argv[1]), keras_infini.__file__
print('import keras_infini', keras_infini.__version__, 'from the fresh environment: ok')
" "$fresh")
