#!/usr/bin/env bash
# The acceptance test of torch_ar on a bare CUDA host (written for one H200
# with torch 2.11+cu130 and nvcc 13.0 preinstalled, no internet): builds the
# extension in place, runs `python -m torch_ar selftest --device cuda`, then
# every CUDA test (one pytest process per file, each with a time limit and a
# JUnit report of its own), the paper-mode and exact-mode benchmarks, the GPU
# targets, and a short real job (one epoch of CIFAR-10 on the small CNN and on
# ResNet-20: backprop, AR eta 1, AR eta 0.1 at its recommended steps), each
# step under `timeout`, all within a time budget (default 470 s, so the whole
# script stays under 8 minutes even if a step hangs).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# Run it from a checkout of the repository (any working directory). Nothing is
# installed: a missing package (pytest, hypothesis, torchvision) fails its step.
# The CIFAR-10 archive (19 MB) is looked for in $GPU_CHECK_DATA, then
# benchmarks/.data/ (an ignored folder that can travel with the checkout),
# then ../shared/data beside the checkout.
#
# Nothing is lost to a time limit or a crash: every step writes its log (and
# the tests their JUnit files) under $OUT as it runs, and gpu_report.md is
# rewritten after every step. Its first lines say, one line per failure, what
# failed; the exit status is non-zero when anything did.
#
# In $OUT:
#   gpu_report.md          failures, device, versions, each step's status and
#                          time, the targets, the tables, the logs of failures
#   env.txt                nvidia-smi, Python/torch/CUDA versions, packages
#   selftest.md/.json      torch_ar selftest on the GPU
#   tests/<file>.xml       JUnit report of each CUDA test file
#   targets.json           each GPU target: value, limit, met
#   paper_cuda.md/.json    benchmarks/bench_paper.py (eta 0.1, 100 steps)
#   exact_cuda.md/.json    benchmarks/bench_exact.py (eta 1)
#   gpu_job.md/.json       benchmarks/gpu_job.py (one CIFAR-10 epoch per row)
#   chunk_size_cuda.md/.json  benchmarks/chunk_size.py (the update kernels'
#                          chunk size: 4096, 16384, 65536 elements)
#   logs/<step>.log        every step's full log
# When committed, the results go to benchmarks/results/ (gpu_report.md, the
# tables and JSON).
#
# Environment knobs:
#   GPU_CHECK_BUDGET_S=470   total seconds for all steps
#   GPU_CHECK_TEST_FILES     the CUDA test files to run (default: every file
#                            with a test marked `cuda`, the graph and CUDA-path
#                            files first)
#   GPU_CHECK_DATA           folder or tarball of CIFAR-10 for the job
#   GPU_CHECK_SKIP           steps not to run, e.g. "bench_paper bench_exact"
#                            (reported as skipped, not as failures)
#   FORCE_CPU_CHECK=1        dry run without a GPU: selftest, benchmarks and the
#                            job on CPU with tiny settings, CPU-only build
#                            (TORCH_AR_CPU_ONLY=1 unless set), the CUDA tests
#                            (all skipped), step limits and budget x4, targets
#                            reported but not judged; checks the script and
#                            the entry points. It rebuilds torch_ar/_C*.so in
#                            place unless GPU_CHECK_SKIP_BUILD=1.
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
  # A dry run on a loaded 2-core machine may need more: GPU_CHECK_SCALE.
  SCALE="${GPU_CHECK_SCALE:-4}"
  BUDGET="${GPU_CHECK_BUDGET_S:-$((470 * SCALE))}"
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

sub_selftest() {
  local device=cuda
  [[ "$DRY" == 1 ]] && device=cpu
  "$PYTHON" -m torch_ar selftest --device "$device" \
    --json "$OUT/selftest.json" --markdown "$OUT/selftest.md"
}

# The test files with at least one test marked `cuda`, the graph and
# CUDA-path files first (they decide whether a GPU session succeeds).
sub_collect() {
  "$PYTHON" -m pytest tests/python -q --collect-only -m cuda -p no:cacheprovider 2>/dev/null \
    | sed -n 's/^\(tests\/python\/[^:]*\.py\)::.*/\1/p' | sort -u >"$OUT/cuda_test_files.all"
  local first=(tests/python/test_cuda_review.py tests/python/test_cuda_graph.py
               tests/python/test_cuda_paths.py)
  {
    for f in "${first[@]}"; do grep -qx "$f" "$OUT/cuda_test_files.all" && echo "$f"; done
    grep -vxF -f <(printf '%s\n' "${first[@]}") "$OUT/cuda_test_files.all" || true
  } >"$OUT/cuda_test_files.txt"
  echo "$(wc -l <"$OUT/cuda_test_files.txt") files with CUDA tests:"
  cat "$OUT/cuda_test_files.txt"
  [[ -s "$OUT/cuda_test_files.txt" ]]
}

sub_tests() {
  local file="$1" missing=0 name
  for name in pytest hypothesis torchvision; do
    if ! "$PYTHON" -c "import $name" >/dev/null 2>&1; then
      echo "MISSING: $name (the CUDA tests need it)"
      missing=1
    fi
  done
  ((missing == 0)) || exit "$MISSING"
  mkdir -p "$OUT/tests"
  local status=0
  "$PYTHON" -m pytest "$file" -q -m cuda -p no:cacheprovider -rfE \
    --junitxml="$OUT/tests/$(basename "$file" .py).xml" || status=$?
  # Exit 5: the file's CUDA tests were all deselected (none to run here).
  [[ "$status" -eq 5 ]] && status=0
  return "$status"
}

sub_job() {
  local data="${GPU_CHECK_DATA:-}"
  if [[ -z "$data" ]]; then
    for candidate in "$ROOT/benchmarks/.data" "$ROOT/../shared/data"; do
      if [[ -e "$candidate/cifar10-jpeg.tar.gz" || -d "$candidate/cifar10-jpeg" ]]; then
        data="$candidate"
        break
      fi
    done
  fi
  if [[ -z "$data" ]]; then
    echo "MISSING: the CIFAR-10 archive (set GPU_CHECK_DATA or put it in benchmarks/.data/)"
    exit "$MISSING"
  fi
  export TORCH_AR_CACHE="${TORCH_AR_CACHE:-$OUT/.cache}"
  if [[ "$DRY" == 1 ]]; then
    "$PYTHON" benchmarks/gpu_job.py --device cpu --data-dir "$data" --out "$OUT" \
      --limit-train-batches 2 --limit-test-batches 1 --steps 3 --cosine-every 1
  else
    "$PYTHON" benchmarks/gpu_job.py --device cuda --data-dir "$data" --out "$OUT"
  fi
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

sub_chunk_size() {
  if [[ "$DRY" == 1 ]]; then
    "$PYTHON" benchmarks/chunk_size.py --device cpu --repeats 1 --scale 16 --sizes 4096,16384 \
      --out "$OUT"
  else
    "$PYTHON" benchmarks/chunk_size.py --device cuda --out "$OUT"
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
  __selftest) sub_selftest; exit 0 ;;
  __collect) sub_collect; exit 0 ;;
  __tests) sub_tests "$2"; exit 0 ;;
  __job) sub_job; exit 0 ;;
  __bench_exact) sub_bench_exact; exit 0 ;;
  __bench_paper) sub_bench_paper; exit 0 ;;
  __targets) sub_targets; exit 0 ;;
  __chunk_size) sub_chunk_size; exit 0 ;;
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

# run_step NAME CAP_SECONDS WHAT [SUBSTEP [ARGS...]]: runs
# `bash gpu_check.sh __SUBSTEP ARGS` (SUBSTEP defaults to NAME) with a timeout
# of at most CAP seconds and at most what is left of the budget, then
# rewrites the report.
run_step() {
  local name="$1" cap=$(($2 * SCALE)) what="$3"
  shift 3
  local sub=("${@:-$name}")
  local log="$LOGS/$name.log"
  if [[ " ${GPU_CHECK_SKIP:-} " == *" $name "* ]]; then
    echo "[$name] skipped (GPU_CHECK_SKIP)" | tee "$log"
    ROWS+=("| $name | skipped (GPU_CHECK_SKIP) | 0 |")
    write_report
    return
  fi
  local left=$((BUDGET - (SECONDS - START) - RESERVE))
  local limit=$((cap < left ? cap : left))
  if ((limit < 10)); then
    echo "[$name] not run: time budget spent" | tee "$log"
    ROWS+=("| $name | NOT RUN (time budget spent) | 0 |")
    REASONS+=("$name: not run, the time budget was spent")
    FAILED=1
    write_report
    return
  fi
  echo "[$name] running (limit ${limit} s), log: $log"
  local t0=$SECONDS rc=0
  timeout -k 10 "$limit" bash "$ROOT/benchmarks/gpu_check.sh" "__${sub[0]}" "${sub[@]:1}" \
    >"$log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status
  case "$rc" in
    0) status="ok" ;;
    "$MISSING")
      status="FAILED (missing package or data)"
      REASONS+=("$name: $(grep -h '^MISSING' "$log" | tr '\n' ' ')")
      FAILED=1 ;;
    124 | 137)
      status="TIMEOUT after ${limit} s"
      REASONS+=("$name: timed out after ${limit} s")
      FAILED=1 ;;
    *)
      status="FAILED (exit $rc)"
      REASONS+=("$name: $what: $(grep -hE '^FAILED|MISSED|Error|error' "$log" | tail -n 1 | cut -c1-200)")
      FAILED=1 ;;
  esac
  echo "[$name] $status in ${dt} s"
  ROWS+=("| $name | $status | $dt |")
  write_report
}

not_run() {
  local why="$1" name
  shift
  for name in "$@"; do
    echo "[$name] not run: $why" | tee "$LOGS/$name.log"
    ROWS+=("| $name | NOT RUN ($why) | 0 |")
    REASONS+=("$name: not run, $why")
  done
  FAILED=1
  write_report
}

write_report() {
  local device
  device="$(sed -n 's/^device: \([^|]*\).*/\1/p' "$OUT/env.txt" 2>/dev/null | head -n 1 | sed 's/ *$//' || true)"
  [[ -n "$device" ]] || device="no CUDA device ($( [[ "$DRY" == 1 ]] && echo "dry run on CPU" || echo "none found"))"
  {
    echo "# torch_ar GPU check on $device"
    echo
    if ((${#REASONS[@]})); then
      echo "**FAILED** (${#REASONS[@]} failure(s)):"
      echo
      printf -- '- %s\n' "${REASONS[@]}"
    elif [[ "${CHECK_DONE:-0}" == 1 && "$DRY" == 1 ]]; then
      echo "**Every step that ran passed** (dry run: the GPU targets are reported, not judged)."
    elif [[ "${CHECK_DONE:-0}" == 1 && -n "${GPU_CHECK_SKIP:-}" ]]; then
      echo "**Every step that ran passed and its targets were met** (skipped: ${GPU_CHECK_SKIP})."
    elif [[ "${CHECK_DONE:-0}" == 1 ]]; then
      echo "**Every step passed and every GPU target was met.**"
    else
      echo "**In progress** (the check was stopped or is still running)."
    fi
    echo
    echo "$(sed -n 's/^date: //p' "$OUT/env.txt" 2>/dev/null || true); commit $(sed -n 's/^commit: //p' "$OUT/env.txt" 2>/dev/null || true);"
    grep -E '^(torch:|python:|CUDA_HOME:|package )' "$OUT/env.txt" 2>/dev/null | sed 's/^/- /' || true
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
    # The tables of every step, in the order the steps run.
    for md in "$OUT/selftest.md" "$OUT/paper_"*.md "$OUT/exact_"*.md "$OUT/gpu_job.md"; do
      [[ -f "$md" ]] || continue
      echo
      echo "---"
      echo
      sed 's/^# /## /' "$md"
    done
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
  } >"$OUT/gpu_report.md.tmp"
  mv "$OUT/gpu_report.md.tmp" "$OUT/gpu_report.md"
}

run_step env 15 "environment"
cp "$LOGS/env.log" "$OUT/env.txt"
run_step build 140 "the build failed"
if [[ "${ROWS[-1]}" == *"| ok |"* ]]; then
  run_step selftest 45 "torch_ar selftest found a failure (see selftest.md)"
  if [[ -n "${GPU_CHECK_TEST_FILES:-}" ]]; then
    printf '%s\n' $GPU_CHECK_TEST_FILES >"$OUT/cuda_test_files.txt"
  else
    run_step collect 30 "collecting the CUDA tests failed"
  fi
  # The first three files (graph, CUDA paths, the review's items) get the
  # longest limits; together the tests may take 160 s of the budget.
  tests_start=$SECONDS
  index=0
  while read -r file; do
    [[ -n "$file" ]] || continue
    cap=$((index < 3 ? 50 : 25))
    left_for_tests=$((160 - (SECONDS - tests_start) / SCALE))
    ((cap > left_for_tests)) && cap=$((left_for_tests > 10 ? left_for_tests : 10))
    run_step "tests_$(basename "$file" .py)" "$cap" "CUDA tests failed (see tests/$(basename "$file" .py).xml)" \
      tests "$file"
    index=$((index + 1))
  done <"$OUT/cuda_test_files.txt"
  run_step bench_paper 60 "paper-mode benchmark failed"
  run_step bench_exact 40 "exact-mode benchmark failed"
  run_step targets 10 "GPU target missed"
  run_step job 100 "the CIFAR-10 job failed (see gpu_job.md)"
  run_step chunk_size 30 "the chunk-size measurement failed"
else
  not_run "the build failed" selftest tests bench_paper bench_exact targets job chunk_size
fi
CHECK_DONE=1
write_report
echo "report: $OUT/gpu_report.md"
exit "$FAILED"
