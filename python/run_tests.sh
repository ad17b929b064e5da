#!/usr/bin/env bash
# ctest entry for the Python front ends: pytest over python/tests with the
# freshly built library. The interpreter: $CULOSS_PYTHON, else the project's
# virtual environment (.venv, made by .ci/run), else python3. Exit 77 (ctest:
# skipped) when numpy or pytest is missing, saying so; with
# CULOSS_REQUIRE_TORCH=1 (CI) a missing torch, numpy or pytest is a failure.
lib=$1
here=$(cd "$(dirname "$0")" && pwd)
py=${CULOSS_PYTHON:-}
if [ -z "$py" ]; then
  if [ -x "$here/../.venv/bin/python" ]; then py=$here/../.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import numpy, pytest" 2>/dev/null; then
  if [ -n "${CULOSS_REQUIRE_TORCH:-}" ]; then
    echo "FAILED: $py lacks numpy/pytest and CULOSS_REQUIRE_TORCH is set"; exit 1
  fi
  echo "skipped: $py with numpy and pytest is not available"
  exit 77
fi
if "$py" -c "import torch" 2>/dev/null; then
  # bench/compare_torch.py's own CPU run, so the comparison tool works before a
  # GPU session needs it
  PYTHONPATH="$here" CULOSS_LIBRARY="$lib" "$py" "$here/../bench/compare_torch.py" --cpu || exit 1
elif [ -n "${CULOSS_REQUIRE_TORCH:-}" ]; then
  echo "FAILED: $py cannot import torch and CULOSS_REQUIRE_TORCH is set"; exit 1
fi
CULOSS_LIBRARY="$lib" exec "$py" -m pytest -q -rs -p no:cacheprovider "$here/tests"
