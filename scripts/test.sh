#!/usr/bin/env bash
# The README's test command: installs what the tests need, then builds and runs
# every test (ctest). On a fresh machine of this project's kind:
#   - Criterion (and pkg-config, cmake) from Debian's packages when run as root;
#     otherwise a clear message naming the packages, and exit 1;
#   - the project's virtual environment .venv with torch, numpy, pytest and what
#     torch's OpInfo database imports (expecttest, hypothesis), from PyPI; the
#     Python suites (ctest's python_binding) run in it.
# Then: cmake -S . -B build ... && cmake --build build && ctest --test-dir build.
# CULOSS_REQUIRE_TORCH=1 (CI) makes a missing torch a failure, not a skip.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d /usr/local/cuda/bin ]; then export PATH="/usr/local/cuda/bin:$PATH"; fi

need=()
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
pkg-config --exists criterion 2>/dev/null || need+=(libcriterion-dev)
command -v cc >/dev/null || need+=(build-essential)
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)
if ((${#need[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing from Debian's packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
  else
    echo "The tests need: ${need[*]}. Install them with:"
    echo "  sudo apt-get install ${need[*]}"
    exit 1
  fi
fi

venv=.venv
if ! "$venv/bin/python" -c "import torch, numpy, pytest, expecttest, hypothesis" 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  echo "== installing into $venv: torch numpy pytest expecttest hypothesis scikit-build-core (PyPI)"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet torch numpy pytest expecttest hypothesis scikit-build-core
fi
"$venv/bin/python" -c "import torch; print('== torch', torch.__version__, 'in $venv')"
export CULOSS_PYTHON="$PWD/$venv/bin/python"

cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCULOSS_BUILD_TESTS=ON
cmake --build build -j "$(nproc 2>/dev/null || echo 2)"
ctest --test-dir build --output-on-failure
