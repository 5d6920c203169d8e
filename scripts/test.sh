#!/usr/bin/env bash
# Runs every test of torch_ar: installs and builds what is missing
# (scripts/setup.sh), then the GoogleTest suite through ctest, then pytest.
# Exits non-zero on any failure, and when pytest collects no test at all.
# Extra arguments go to pytest, e.g. bash scripts/test.sh -k relax_update
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$SECONDS

source scripts/setup.sh

section "build C++ tests (cmake, build/cpp)"
cmake_start=$SECONDS
TORCH_CMAKE_PREFIX="$("$PYTHON" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
TORCH_CXX11_ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
generator=()
if [[ ! -f build/cpp/CMakeCache.txt ]] && command -v ninja >/dev/null 2>&1; then
  generator=(-G Ninja)
fi
# The tests link the extension setup.py just built (csrc/ is compiled once);
# its module init refers to libpython, so that takes a shared libpython. Without
# one, CMake compiles csrc/ into a static library of its own.
EXTENSION="$(compgen -G "$ROOT/torch_ar/_C.*.so" | head -n 1 || true)"
PYTHON_LIBRARY="$("$PYTHON" - <<'PY'
import os, sysconfig
name = sysconfig.get_config_var("LDLIBRARY") or ""
path = os.path.join(sysconfig.get_config_var("LIBDIR") or "", name)
print(path if name.endswith(".so") and os.path.isfile(path) else "")
PY
)"
if [[ -z "$PYTHON_LIBRARY" ]]; then
  echo "no shared libpython: the C++ tests compile csrc/ themselves"
  EXTENSION=""
fi
cmake -S . -B build/cpp "${generator[@]}" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$TORCH_CMAKE_PREFIX" \
  -DTORCH_AR_CXX11_ABI="$TORCH_CXX11_ABI" \
  -DTORCH_AR_EXTENSION="$EXTENSION" \
  -DTORCH_AR_PYTHON_LIBRARY="$PYTHON_LIBRARY"
cmake --build build/cpp --parallel "$MAX_JOBS"
echo "C++ test build took $((SECONDS - cmake_start)) s"

section "C++ tests (ctest)"
ctest --test-dir build/cpp --output-on-failure --no-tests=error --parallel "$MAX_JOBS"

section "Python tests (pytest)"
pytest_status=0
"$PYTHON" -m pytest tests/python -q "$@" || pytest_status=$?
if [[ "$pytest_status" -eq 5 ]]; then
  echo "pytest collected no tests: counted as a failure"
  exit 1
elif [[ "$pytest_status" -ne 0 ]]; then
  echo "pytest failed (exit $pytest_status)"
  exit "$pytest_status"
fi

section "all tests passed in $((SECONDS - start)) s"
