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
CULOSS_LIBRARY="$lib" exec python3 -m pytest -q -rs -p no:cacheprovider "$here/tests"
