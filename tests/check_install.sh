#!/usr/bin/env bash
# Installs the build tree into a scratch prefix, then builds and runs a tiny
# consumer with find_package(culoss CONFIG) (shared and static) and with
# pkg-config.
set -euo pipefail
build=$1 src=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake --install "$build" --prefix "$tmp/prefix" >/dev/null
cmake -S "$src/tests/consumer" -B "$tmp/consumer" -DCMAKE_PREFIX_PATH="$tmp/prefix" \
      -DCMAKE_BUILD_RPATH="$tmp/prefix/lib" >/dev/null
cmake --build "$tmp/consumer" >/dev/null
"$tmp/consumer/consumer_shared"
"$tmp/consumer/consumer_static"
pc_dir=$(dirname "$(find "$tmp/prefix" -name culoss.pc | head -1)")
flags=$(PKG_CONFIG_PATH="$pc_dir" pkg-config --cflags --libs culoss)
cc -std=c11 -o "$tmp/consumer_pc" "$src/tests/consumer/main.c" $flags -lm \
   -Wl,-rpath,"$(PKG_CONFIG_PATH="$pc_dir" pkg-config --variable=libdir culoss)"
"$tmp/consumer_pc"
# the header from C++ (extern "C", no cuda_runtime.h needed)
if command -v c++ >/dev/null; then
  printf '#include <culoss.h>\n#include <cstdio>\nint main() { std::printf("c++ ok: %%d\\n", culoss_version()); return culoss_version() > 0 ? 0 : 1; }\n' >"$tmp/cxx.cpp"
  c++ -std=c++11 -Wall -Wextra -Werror -pedantic -o "$tmp/consumer_cxx" "$tmp/cxx.cpp" $flags \
     -Wl,-rpath,"$(PKG_CONFIG_PATH="$pc_dir" pkg-config --variable=libdir culoss)"
  "$tmp/consumer_cxx"
fi
echo "install consumer: find_package (shared, static), pkg-config and C++ all ok"
