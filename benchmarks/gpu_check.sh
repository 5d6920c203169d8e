#!/usr/bin/env bash
# The acceptance test of torch_ar on a bare CUDA host (written for one H200
# with torch 2.11+cu130 and nvcc 13.0 preinstalled, no internet): builds the
# extension in place, checks the fused update and CUDA-graph replay, runs every
# CUDA test, the paper-mode and exact-mode benchmarks, and checks the GPU
# targets, each step under `timeout`, all within a time budget (default 470 s,
# so the whole script stays under 8 minutes even if a step hangs).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Run it from a checkout of the repository (any working directory). Nothing is
# installed: a missing package (pytest, hypothesis, torchvision) fails its step.
#
# The exit status is non-zero when anything is wrong, and gpu_report.md then
# starts with one line per failure: the build failed; a package is missing; a
# CUDA test failed (all of them run; JUnit report in cuda_tests.xml); the
# fused update or the CUDA graph fell back without saying so; a GPU target was
# missed (exact resnet18 batch 128 backward <= 1.5x autograd's; a literal
# paper-mode step <= 1.2x an input-only VJP sweep; the closed form's peak
# memory <= 1.5x autograd's; the closed form at the paper's settings <= 3x
# autograd's forward + backward); a step timed out or was not reached.
#
# In $OUT:
#   gpu_report.md          failures, device, versions, each step's status and
#                          time, the targets, the benchmark tables, test tail
#   env.txt                nvidia-smi, Python/torch/CUDA versions, packages
#   cuda_tests.xml         JUnit report of every CUDA test
#   targets.json           each GPU target: value, limit, met
#   paper_cuda.md/.json    benchmarks/bench_paper.py (eta 0.1, 100 steps)
#   exact_cuda.md/.json    benchmarks/bench_exact.py (eta 1)
#   logs.tar.gz            every step's full log (GPU_CHECK_KEEP_LOGS=1 keeps
#                          them as $OUT/logs/<step>.log instead)
# When committed, the results go to benchmarks/results/ (gpu_report.md, the
# tables and JSON, targets.json).
#
# Order, by value, so that a short budget keeps what matters most: env,
# build, smoke (fused + graph against eager), tests, bench_paper, bench_exact,
# targets. After a failure the later steps still run where they can.
#
# Environment knobs:
#   GPU_CHECK_BUDGET_S=470   total seconds for all steps
#   FORCE_CPU_CHECK=1        dry run without a GPU: benchmarks on CPU with tiny
#                            settings, CPU-only build (TORCH_AR_CPU_ONLY=1
#                            unless set), the CUDA tests (all skipped), step
#                            limits and budget x4, targets reported but not
#                            judged; checks the script and the entry points. It
#                            rebuilds torch_ar/_C*.so in place unless
#                            GPU_CHECK_SKIP_BUILD=1.
#   GPU_CHECK_SKIP_BUILD=1   use the extension already built in torch_ar/
#   GPU_CHECK_NO_NINJA=1     build as if ninja were missing (tests that path)
#   TORCH_CUDA_ARCH_LIST     default: the GPU's own compute capability
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
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
SCALE=1      # step limits are multiplied by this (CPU dry runs are slower)
if [[ "$DRY" == 1 ]]; then
  SCALE=4
  BUDGET="${GPU_CHECK_BUDGET_S:-1880}"
fi
RESERVE=10   # seconds kept for the report at the end
MISSING=99   # exit status of a sub-step that could not run (missing package)

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
    if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
      # This GPU's own architecture: one arch builds in half the time.
      TORCH_CUDA_ARCH_LIST="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo "9.0")"
    fi
    export TORCH_CUDA_ARCH_LIST
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
  "$PYTHON" -c "import torch_ar; print('torch_ar._C:', torch_ar._C.__file__)"
}

sub_smoke() {
  if [[ "$DRY" == 1 ]]; then
    echo "dry run: no CUDA smoke check"
    return 0
  fi
  "$PYTHON" - <<'EOF'
import torch
import torch_ar
from torch import nn

x = torch.zeros(4, device="cuda"); t = torch.ones(4, device="cuda")
norms = torch.ops.torch_ar.relax_update_([x], [t], 0.5, 0.0)
torch.cuda.synchronize()
assert torch.allclose(x, torch.full_like(x, 0.5)), x
print("CUDA relax_update_ kernel: ok", norms.tolist())
# Paper mode with the fused update and a CUDA graph, and the closed form,
# against the unfused eager steps: evidence even where pytest is missing.
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 300), nn.ReLU(),
                    nn.Linear(300, 10)).cuda()
x = torch.randn(64, 784, device="cuda")
grads, stats = {}, {}
for name, kw in {"unfused eager": {"fuse_activations": False, "evaluation": "literal"},
                 "fused + cuda_graph": {"cuda_graph": True},
                 "closed form": {}}.items():
    ar = torch_ar.ARBackward(net, eta=0.1, steps=100, **kw)
    net.zero_grad()
    ar(x).square().sum().backward()
    grads[name] = [p.grad.clone() for p in net.parameters()]
    s = stats[name] = ar.last_stats
    print(f"{name}: evaluation={s.evaluation} fused_activations={s.fused_activations} "
          f"graph_steps={s.graph_steps} sweeps={s.sweeps}")
graphed = stats["fused + cuda_graph"]
# The speed paths must run, not fall back without a word.
assert graphed.graph_steps == 99, f"FAILED: CUDA graph fell back: graph_steps={graphed.graph_steps}"
assert graphed.fused_activations == 2, f"FAILED: fused update fell back: {graphed.fused_activations}"
assert stats["closed form"].evaluation == "closed_form", stats["closed form"].evaluation
reference = grads["unfused eager"]
for name in ("fused + cuda_graph", "closed form"):
    err = max(((a - b).abs().max() / b.abs().max()).item()
              for a, b in zip(grads[name], reference))
    print(f"{name} vs unfused eager: max relative difference {err:.2e}")
    assert err < 1e-4, f"FAILED: {name} differs from the eager steps by {err:.2e}"
EOF
}

sub_tests() {
  local missing=0 name
  for name in pytest hypothesis torchvision; do
    if ! "$PYTHON" -c "import $name" >/dev/null 2>&1; then
      echo "MISSING: $name (the CUDA tests need it)"
      missing=1
    fi
  done
  ((missing == 0)) || exit "$MISSING"
  # Every CUDA test, not stopping at the first failure: conftest.py marks
  # `cuda` each test whose id names CUDA or whose skip reason needs it.
  "$PYTHON" -m pytest tests/python -q -m cuda -p no:cacheprovider -rfE \
    --junitxml="$OUT/cuda_tests.xml"
}

sub_bench_exact() {
  if ! "$PYTHON" -c "import torchvision" >/dev/null 2>&1; then
    echo "MISSING: torchvision (bench_exact.py times resnet18)"
    exit "$MISSING"
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

# The GPU targets, from the benchmarks' JSON: one line per target, exit 1 if
# one is missed (a dry run on the CPU reports them without judging).
sub_targets() {
  "$PYTHON" - "$OUT" "$DRY" <<'EOF'
import json, sys
from pathlib import Path

out, dry = Path(sys.argv[1]), sys.argv[2] == "1"
tag = "cpu" if dry else "cuda"
targets = []

def target(name, value, limit):
    met = value is not None and value <= limit
    targets.append({"target": name, "value": value, "limit": limit, "met": met})
    shown = "not measured" if value is None else f"{value:.3f}"
    print(f"{'met' if met else 'MISSED'}: {name}: {shown} (limit {limit})")

exact = out / f"exact_{tag}.json"
paper = out / f"paper_{tag}.json"
rows = json.loads(exact.read_text())["rows"] if exact.is_file() else []
resnet = [r for r in rows if r["model"].startswith("resnet18")]
target("exact resnet18 backward / autograd's",
       resnet[0]["backward_ratio"] if resnet else None, 1.5)
rows = json.loads(paper.read_text())["rows"] if paper.is_file() else []
for r in rows:
    name = "paper MLP" if r["model"].startswith("paper") else "CIFAR CNN"
    step = r.get("ar_step_over_vjp_sweep")
    target(f"{name}: literal step / input-only VJP sweep",
           step if step is not None and step > 0 else None, 1.2)
    memory = r.get("memory_mib", {})
    target(f"{name}: closed-form peak memory / autograd's",
           memory["ar_closed"] / memory["autograd"] if memory.get("autograd") else None, 1.5)
    target(f"{name}: closed form / autograd forward + backward",
           r.get("ar_closed_over_autograd_total"), 3.0)
if not rows:
    target("paper-mode benchmark ran", None, 0)
(out / "targets.json").write_text(json.dumps({"device": tag, "targets": targets}, indent=1))
if not dry and not all(t["met"] for t in targets):
    sys.exit(1)
EOF
}

case "${1:-}" in
  __env) sub_env; exit 0 ;;
  __build) sub_build; exit 0 ;;
  __smoke) sub_smoke; exit 0 ;;
  __tests) sub_tests; exit 0 ;;
  __bench_exact) sub_bench_exact; exit 0 ;;
  __bench_paper) sub_bench_paper; exit 0 ;;
  __targets) sub_targets; exit 0 ;;
  "") ;;
  *) echo "unknown argument: $1" >&2; exit 2 ;;
esac

# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

START=$SECONDS
ROWS=()
FAILED=0
REASONS=()   # one line per failure, at the top of the report

# run_step NAME CAP_SECONDS WHAT: runs `bash gpu_check.sh __NAME` with a
# timeout of at most CAP seconds and at most what is left of the budget.
run_step() {
  local name="$1" cap=$(($2 * SCALE)) what="$3"
  local log="$LOGS/$name.log"
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[$name] not run: time budget spent" | tee "$log"
    ROWS+=("| $name | NOT RUN (time budget spent) | 0 |")
    REASONS+=("$name: not run, the time budget was spent")
    FAILED=1
    return
  fi
  echo "[$name] running (limit ${limit} s), log: $log"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" bash "$ROOT/benchmarks/gpu_check.sh" "__$name" >"$log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status
  case "$rc" in
    0) status="ok" ;;
    "$MISSING")
      status="FAILED (missing package)"
      REASONS+=("$name: $(grep -h '^MISSING' "$log" | tr '\n' ' ')")
      FAILED=1 ;;
    124 | 137)
      status="TIMEOUT after ${limit} s"
      REASONS+=("$name: timed out after ${limit} s")
      FAILED=1 ;;
    *)
      status="FAILED (exit $rc)"
      REASONS+=("$name: $what: $(grep -hE 'MISSED|FAILED|Error|error' "$log" | tail -n 1 | cut -c1-200)")
      FAILED=1 ;;
  esac
  echo "[$name] $status in ${dt} s"
  ROWS+=("| $name | $status | $dt |")
}

not_run() {
  local name
  for name in "$@"; do
    echo "[$name] not run: the build failed" | tee "$LOGS/$name.log"
    ROWS+=("| $name | NOT RUN (build failed) | 0 |")
    REASONS+=("$name: not run, the build failed")
  done
  FAILED=1
}

run_step env 15 "environment"
cp "$LOGS/env.log" "$OUT/env.txt"
run_step build 140 "the build failed"
if [[ "${ROWS[-1]}" == *"| ok |"* ]]; then
  run_step smoke 30 "fused update or CUDA graph wrong or not taken"
  run_step tests 150 "CUDA tests failed (see cuda_tests.xml)"
  run_step bench_paper 70 "paper-mode benchmark failed"
  run_step bench_exact 45 "exact-mode benchmark failed"
  run_step targets 10 "GPU target missed"
else
  not_run smoke tests bench_paper bench_exact targets
fi

# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------

device="$(sed -n 's/^device: \([^|]*\).*/\1/p' "$OUT/env.txt" | head -n 1 | sed 's/ *$//')"
[[ -n "$device" ]] || device="no CUDA device ($( [[ "$DRY" == 1 ]] && echo "dry run on CPU" || echo "none found"))"
{
  echo "# torch_ar GPU check on $device"
  echo
  if ((${#REASONS[@]})); then
    echo "**FAILED** (${#REASONS[@]} failure(s)):"
    echo
    printf -- '- %s\n' "${REASONS[@]}"
  else
    echo "**Every step passed and every GPU target was met.**"
  fi
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
  if [[ -f "$LOGS/targets.log" ]]; then
    echo
    echo "## GPU targets"
    echo
    echo '```'
    cat "$LOGS/targets.log"
    echo '```'
  fi
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
