#!/usr/bin/env bash
# Installs what torch_ar needs and builds it in place; a quick no-op when
# everything is already there. Run it (or source it) from anywhere:
#   bash scripts/setup.sh
# Environment: PYTHON (default python, else python3), MAX_JOBS (2),
# TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX": A100, H100/H200, and PTX for newer GPUs),
# TORCH_AR_CPU_ONLY=1 to skip the CUDA sources.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHON
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0+PTX}"

section() { printf '\n==== %s ====\n' "$*"; }

is_root() { [[ "$(id -u)" -eq 0 ]]; }

APT_UPDATED=0
apt_install() {
  if ! is_root; then
    echo "not root: skipping 'apt-get install $*'; install it by hand"
    return 0
  fi
  if [[ "$APT_UPDATED" -eq 0 ]]; then
    apt-get update -q
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

section "system packages"
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist
if [[ -d "$FASHION_MNIST_DIR" ]] && compgen -G "$FASHION_MNIST_DIR/*" >/dev/null; then
  echo "fashion-mnist present"
else
  apt_install dataset-fashion-mnist
fi
missing_tools=()
command -v cmake >/dev/null 2>&1 || missing_tools+=(cmake)
command -v g++ >/dev/null 2>&1 || missing_tools+=(g++)
[[ -f /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake || -f /usr/lib/cmake/GTest/GTestConfig.cmake ]] \
  || missing_tools+=(libgtest-dev)
if [[ "${#missing_tools[@]}" -gt 0 ]]; then
  apt_install "${missing_tools[@]}"
else
  echo "cmake, g++, GoogleTest present"
fi

section "python packages"
# Compares installed versions with the pins (local labels such as +cu130
# ignored); pip runs only when something is missing or differs.
if mismatches="$("$PYTHON" - requirements.txt <<'PY'
import re
import sys
from importlib.metadata import PackageNotFoundError, version

bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if not line:
        continue
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", line)
    if not m:
        bad.append(f"{line} (unpinned line, let pip decide)")
        continue
    name, pinned = m.groups()
    try:
        installed = version(name).split("+", 1)[0]
    except PackageNotFoundError:
        bad.append(f"{name} missing")
        continue
    if installed != pinned:
        bad.append(f"{name} {installed} != {pinned}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
PY
)"; then
  echo "all pinned packages installed"
else
  echo "$mismatches"
  "$PYTHON" -m pip install -r requirements.txt
fi

section "peer library for the tests (BioTorch, without its declared dependencies)"
# biotorch 0.0.16 declares jupyter, pandas, torchattacks, ... that its models
# do not import; the peer tests need only those (tests/python/test_peer_biotorch.py).
if "$PYTHON" -c 'import importlib.metadata as m, sys; sys.exit(m.version("biotorch") != "0.0.16")' 2>/dev/null; then
  echo "biotorch 0.0.16 present"
else
  "$PYTHON" -m pip install --no-deps biotorch==0.0.16
fi

section "build torch_ar._C (setup.py build_ext --inplace)"
# Skipped when the library is newer than every source, header, folder (a
# file added or removed changes its folder), setup.py and the installed torch;
# otherwise ninja recompiles only the objects whose inputs changed, then
# relinks. Changing TORCH_AR_CPU_ONLY or TORCH_CUDA_ARCH_LIST needs a rebuild
# by hand: rm torch_ar/_C.*.so
built_library="$(compgen -G 'torch_ar/_C.*.so' | head -n 1 || true)"
torch_version_file="$("$PYTHON" -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0] + "/version.py")')"
if [[ -n "$built_library" && -z "$(find csrc kernels setup.py "$torch_version_file" -newer "$built_library" -print -quit 2>/dev/null)" ]]; then
  echo "$built_library is up to date"
else
  build_start=$SECONDS
  "$PYTHON" setup.py build_ext --inplace
  echo "build_ext took $((SECONDS - build_start)) s"
fi
