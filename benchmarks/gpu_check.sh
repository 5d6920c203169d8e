#!/usr/bin/env bash
# One-shot check of torch_ar on a bare CUDA host (written for one H200 with
# torch 2.11+cu130 and nvcc 13.0 preinstalled, no internet): builds the
# extension in place, runs the paper-mode and exact-mode benchmarks and the
# CUDA tests, each step under `timeout`, all within a time budget (default
# 420 s, so the whole script stays under 8 minutes even if a step hangs).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Run it from a checkout of the repository (any working directory). Nothing is
# installed: the pip packages already there are used, and steps that need a
# missing one (pytest, torchvision) are skipped with a note.
#
# In $OUT (at most 7 files, so that everything fits a small transfer):
#   gpu_report.md          summary: device, versions, each step's status and
#                          time, the benchmark tables, tails of failed logs
#   env.txt                nvidia-smi, Python/torch/CUDA versions, packages
#   paper_cuda.md/.json    benchmarks/bench_paper.py (eta 0.1, 100 steps)
#   exact_cuda.md/.json    benchmarks/bench_exact.py (eta 1)
#   logs.tar.gz            every step's full log (GPU_CHECK_KEEP_LOGS=1 keeps
#                          them as $OUT/logs/<step>.log instead)
# When committed, the results go to benchmarks/results/ (gpu_report.md and the
# paper_/exact_ tables and JSON).
#
# Order, by priority: env, build, bench_paper, bench_exact, tests (CUDA tests:
# pytest -k cuda -x). The exit status is non-zero if any step failed or timed
# out; the other steps still run.
#
# Environment knobs:
#   GPU_CHECK_BUDGET_S=420   total seconds for all steps
#   FORCE_CPU_CHECK=1        dry run without a GPU: benchmarks on CPU with tiny
#                            settings, CPU-only build (TORCH_AR_CPU_ONLY=1
#                            unless set), pytest -k cuda (all skipped), step
#                            limits and budget x4; checks the script and the
#                            entry points. It rebuilds torch_ar/_C*.so in place
#                            unless GPU_CHECK_SKIP_BUILD=1.
#   GPU_CHECK_SKIP_BUILD=1   use the extension already built in torch_ar/
#   GPU_CHECK_NO_NINJA=1     build as if ninja were missing (tests that path)
#   PYTHON=python3           interpreter (default: python, else python3)
set -euo pipefail

OUT="${OUT:?set OUT to the output folder, e.g. OUT=/some/dir bash benchmarks/gpu_check.sh}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"

if [[ -z "${PYTHON:-}" ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export PYTHONDONTWRITEBYTECODE=1
DRY="${FORCE_CPU_CHECK:-0}"
BUDGET="${GPU_CHECK_BUDGET_S:-420}"
SCALE=1      # step limits are multiplied by this (CPU dry runs are slower)
if [[ "$DRY" == 1 ]]; then
  SCALE=4
  BUDGET="${GPU_CHECK_BUDGET_S:-1680}"
fi
RESERVE=10   # seconds kept for the report at the end
SKIPPED=99   # exit status of a sub-step that could not run (missing package)

# --------------------------------------------------------------------------
# Sub-steps, run as `bash gpu_check.sh __name` under timeout
# --------------------------------------------------------------------------

sub_env() {
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "host: $(uname -a)"
  echo "dry run (FORCE_CPU_CHECK): $DRY"
  if git rev-parse HEAD >/dev/null 2>&1; then
    echo "commit: $(git rev-parse HEAD)"
    echo "modified or untracked files: $(git status --short | wc -l)"
  else
    echo "commit: unknown (no git checkout)"
  fi
  echo "nproc: $(nproc)"
  echo
  echo "== nvidia-smi"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || echo "nvidia-smi failed ($?)"
    nvidia-smi -L || true
  else
    echo "nvidia-smi not found"
  fi
  echo
  echo "== nvcc"
  if command -v nvcc >/dev/null 2>&1; then nvcc --version; else echo "nvcc not on PATH"; fi
  echo
  echo "== python / torch"
  "$PYTHON" - <<'EOF'
import importlib, platform, sys
print("python:", sys.version.replace("\n", " "), "at", sys.executable)
import torch
print("torch:", torch.__version__, "| torch CUDA:", torch.version.cuda,
      "| cudnn:", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"device: {torch.cuda.get_device_name(i)} | capability {p.major}.{p.minor} "
              f"| {p.total_memory / 2**30:.1f} GiB | {p.multi_processor_count} SMs")
from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
print("CUDA_HOME:", CUDA_HOME, "| ninja:", is_ninja_available())
for name in ("pytest", "hypothesis", "torchvision", "numpy", "setuptools"):
    try:
        mod = importlib.import_module(name)
        print(f"package {name}: {getattr(mod, '__version__', 'present')}")
    except Exception as exc:  # noqa: BLE001
        print(f"package {name}: MISSING ({type(exc).__name__}: {exc})")
EOF
}

sub_build() {
  if [[ "${GPU_CHECK_SKIP_BUILD:-0}" == 1 ]]; then
    echo "GPU_CHECK_SKIP_BUILD=1: using the extension already in torch_ar/"
  else
    export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
    export MAX_JOBS="${MAX_JOBS:-16}"
    if [[ "$DRY" == 1 ]]; then
      export TORCH_AR_CPU_ONLY="${TORCH_AR_CPU_ONLY:-1}"
    else
      export FORCE_CUDA=1   # fail loudly rather than build a CPU-only extension
    fi
    # A stale library (say, a CPU-only one carried with the checkout) must not
    # survive a failed build and be tested instead.
    rm -f torch_ar/_C*.so
    local tmp
    tmp="$(mktemp -d)"
    echo "python setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS, temp $tmp)"
    # Like `python setup.py build_ext --inplace`; where ninja is missing, torch
    # falls back to compiling one source at a time (minutes): the sources are
    # then compiled in MAX_JOBS threads instead (.cu files first, one by one,
    # since torch swaps the compiler executable around each of them).
    "$PYTHON" - "$tmp" <<'EOF'
import os, runpy, sys, types
from concurrent.futures import ThreadPoolExecutor
import setuptools  # noqa: F401  (before torch.utils.cpp_extension imports distutils)
import torch.utils.cpp_extension as ext

if os.environ.get("GPU_CHECK_NO_NINJA") == "1":
    ext.is_ninja_available = lambda: False
jobs = int(os.environ.get("MAX_JOBS", "16"))

def parallel_compile(self, sources, output_dir=None, macros=None, include_dirs=None,
                     debug=False, extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs)
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    todo = [(obj, *build[obj]) for obj in objects if obj in build]
    one = lambda t: self._compile(t[0], t[1], t[2], cc_args, extra_postargs, pp_opts)
    for t in todo:
        if t[1].endswith(".cu"):
            one(t)
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, [t for t in todo if not t[1].endswith(".cu")]))
    return objects

original = ext.BuildExtension.build_extensions
def build_extensions(self):
    if not self.use_ninja:
        print(f"ninja not available: compiling in {jobs} threads", flush=True)
        self.compiler.compile = types.MethodType(parallel_compile, self.compiler)
    return original(self)
ext.BuildExtension.build_extensions = build_extensions

sys.argv = ["setup.py", "build_ext", "--inplace", "--build-temp", sys.argv[1]]
runpy.run_path("setup.py", run_name="__main__")
EOF
    rm -rf "$tmp"
  fi
  echo "== import check"
  "$PYTHON" - <<EOF
import torch, torch_ar
print("torch_ar._C:", torch_ar._C.__file__)
if "$DRY" != "1":
    x = torch.zeros(4, device="cuda"); t = torch.ones(4, device="cuda")
    norms = torch.ops.torch_ar.relax_update_([x], [t], 0.5, 0.0)
    torch.cuda.synchronize()
    assert torch.allclose(x, torch.full_like(x, 0.5)), x
    print("CUDA relax_update_ kernel: ok", norms.tolist())
    # Paper mode with the fused update and a CUDA graph against the unfused
    # eager steps: evidence even where pytest is missing.
    from torch import nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                        nn.Linear(300, 10)).cuda()
    x = torch.randn(64, 784, device="cuda")
    grads = {}
    for name, kw in {"unfused eager": {"fuse_activations": False},
                     "fused + cuda_graph": {"cuda_graph": True}}.items():
        ar = torch_ar.ARBackward(net, eta=0.1, steps=100, **kw)
        net.zero_grad()
        ar(x).square().sum().backward()
        grads[name] = [p.grad.clone() for p in net.parameters()]
        print(f"{name}: fused_activations={ar.last_stats.fused_activations} "
              f"graph_steps={ar.last_stats.graph_steps}")
    err = max(((a - b).abs().max() / b.abs().max()).item()
              for a, b in zip(*grads.values()))
    print(f"fused + cuda_graph vs unfused eager: max relative difference {err:.2e}")
    assert err < 1e-5, err
EOF
}

sub_tests() {
  if ! "$PYTHON" -c "import pytest" >/dev/null 2>&1; then
    echo "NOTE: pytest is not installed here, so the CUDA tests cannot run."
    echo "bench_paper.py's gradient table (torch_ar eta 1 vs autograd on CUDA) is the only CUDA check."
    exit "$SKIPPED"
  fi
  local extra=()
  if ! "$PYTHON" -c "import hypothesis" >/dev/null 2>&1; then
    # Test files that import hypothesis would stop the run at collection.
    local f
    for f in $(grep -l -E '^(from|import) hypothesis' tests/python/*.py || true); do
      echo "NOTE: hypothesis missing: ignoring $f"
      extra+=("--ignore=$f")
    done
  fi
  if ! "$PYTHON" -c "import torchvision" >/dev/null 2>&1; then
    echo "NOTE: torchvision missing: tests of torchvision models will fail"
  fi
  "$PYTHON" -m pytest tests/python -q -k cuda -x -p no:cacheprovider -rfE "${extra[@]}"
}

sub_bench_exact() {
  if ! "$PYTHON" -c "import torchvision" >/dev/null 2>&1; then
    echo "NOTE: torchvision is not installed here; bench_exact.py needs it (resnet18)."
    exit "$SKIPPED"
  fi
  if [[ "$DRY" == 1 ]]; then
    "$PYTHON" benchmarks/bench_exact.py --device cpu --repeats 1 --out "$OUT"
  else
    "$PYTHON" benchmarks/bench_exact.py --device cuda --out "$OUT"
  fi
}

sub_bench_paper() {
  if [[ "$DRY" == 1 ]]; then
    "$PYTHON" benchmarks/bench_paper.py --device cpu --threads 1 --repeats 1 --warmup 0 \
      --steps 4 --lo-steps 2 --cnn-batch 4 --out "$OUT"
  else
    "$PYTHON" benchmarks/bench_paper.py --device cuda --out "$OUT"
  fi
}

case "${1:-}" in
  __env) sub_env; exit 0 ;;
  __build) sub_build; exit 0 ;;
  __tests) sub_tests; exit 0 ;;
  __bench_exact) sub_bench_exact; exit 0 ;;
  __bench_paper) sub_bench_paper; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

START=$SECONDS
ROWS=()
FAILED=0

# run_step NAME CAP_SECONDS: runs `bash gpu_check.sh __NAME` with a timeout of
# at most CAP seconds and at most what is left of the budget.
run_step() {
  local name="$1" cap=$(($2 * SCALE))
  local log="$LOGS/$name.log"
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 15)); then
    echo "[$name] not run: time budget spent" | tee "$log"
    ROWS+=("| $name | NOT RUN (time budget spent) | 0 |")
    FAILED=1
    return
  fi
  echo "[$name] running (limit ${limit} s), log: $log"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" bash "$ROOT/benchmarks/gpu_check.sh" "__$name" >"$log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status
  case "$rc" in
    0) status="ok" ;;
    "$SKIPPED") status="SKIPPED (missing package, see log)" ;;
    124 | 137) status="TIMEOUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "[$name] $status in ${dt} s"
  ROWS+=("| $name | $status | $dt |")
}

run_step env 45
cp "$LOGS/env.log" "$OUT/env.txt"
run_step build 240
if [[ "${ROWS[-1]}" == *"| ok |"* ]]; then
  run_step bench_paper 150
  run_step bench_exact 90
  run_step tests 240
else
  for s in bench_paper bench_exact tests; do
    echo "[$s] not run: the build failed" | tee "$LOGS/$s.log"
    ROWS+=("| $s | NOT RUN (build failed) | 0 |")
  done
  FAILED=1
fi

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

device="$(sed -n 's/^device: \([^|]*\).*/\1/p' "$OUT/env.txt" | head -n 1 | sed 's/ *$//')"
[[ -n "$device" ]] || device="no CUDA device ($( [[ "$DRY" == 1 ]] && echo "dry run on CPU" || echo "none found"))"
{
  echo "# torch_ar GPU check on $device"
  echo
  echo "$(sed -n 's/^date: //p' "$OUT/env.txt"); commit $(sed -n 's/^commit: //p' "$OUT/env.txt");"
  grep -E '^(torch:|python:|CUDA_HOME:|package )' "$OUT/env.txt" | sed 's/^/- /' || true
  if [[ "$DRY" == 1 ]]; then
    echo
    echo "**Dry run (FORCE_CPU_CHECK=1): CPU only, tiny settings; not a GPU result.**"
  fi
  echo
  echo "| step | status | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Total $((SECONDS - START)) s of a ${BUDGET} s budget."
  for f in paper exact; do
    for md in "$OUT/${f}_"*.md; do
      [[ -f "$md" ]] || continue
      echo
      echo "---"
      echo
      sed 's/^# /## /' "$md"
    done
  done
  echo
  echo "---"
  echo
  echo "## Tests (tail of tests.log)"
  echo
  echo '```'
  tail -n 15 "$LOGS/tests.log" 2>/dev/null || echo "(no log)"
  echo '```'
  for row in "${ROWS[@]}"; do
    [[ "$row" == *"| ok |"* ]] && continue
    name="$(echo "$row" | cut -d'|' -f2 | tr -d ' ')"
    echo
    echo "## $name: last 40 lines of its log"
    echo
    echo '```'
    tail -n 40 "$LOGS/$name.log" 2>/dev/null || echo "(no log)"
    echo '```'
  done
} >"$OUT/gpu_report.md"

if [[ "${GPU_CHECK_KEEP_LOGS:-0}" != 1 ]]; then
  tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
fi
echo "report: $OUT/gpu_report.md"
exit "$FAILED"
