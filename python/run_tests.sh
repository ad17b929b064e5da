#!/usr/bin/env bash
# ctest entry for the Python binding: pytest over python/tests with the
# freshly built library. Exit 77 (ctest: skipped) when numpy or pytest is
# missing, saying so.
lib=$1
here=$(cd "$(dirname "$0")" && pwd)
if ! python3 -c "import numpy, pytest" 2>/dev/null; then
  echo "skipped: python3 with numpy and pytest is not available"
  exit 77
fi
# with torch (CPU is enough): bench/compare_torch.py's own CPU run, so the
# comparison tool works before a GPU session needs it
if python3 -c "import torch" 2>/dev/null; then
  CULOSS_LIBRARY="$lib" python3 "$here/../bench/compare_torch.py" --cpu || exit 1
fi
CULOSS_LIBRARY="$lib" exec python3 -m pytest -q -rs -p no:cacheprovider "$here/tests"
