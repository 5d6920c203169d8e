"""Builds torch_ar._C, the native operators of torch_ar.

torch must already be installed: `pip install --no-build-isolation .` (or
`-e .`, or `python setup.py build_ext --inplace` for a checkout); the project's
metadata is in pyproject.toml.

CUDA sources (kernels/**/*.cu) are compiled when torch itself has CUDA and a
CUDA toolkit is found, or when FORCE_CUDA=1; whether a GPU is visible does not
matter. TORCH_AR_CPU_ONLY=1 skips them. TORCH_CUDA_ARCH_LIST defaults to
"8.0;9.0+PTX": machine code for A100 (sm_80) and H100/H200 (sm_90), and PTX
that newer GPUs compile when the library loads; a list set by the user wins.
MAX_JOBS defaults to 2.
"""

import glob
import os

from setuptools import setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
os.environ.setdefault("MAX_JOBS", "2")

# torch reads the two variables above when it builds.
import torch
from torch.utils.cpp_extension import (
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
# build_ext --inplace copies the library into torch_ar/, which must exist.
os.makedirs(os.path.join(ROOT, "torch_ar"), exist_ok=True)


def project_files(*patterns: str) -> list[str]:
    """Files under the project root matching the recursive glob patterns, relative paths."""
    found: set[str] = set()
    for pattern in patterns:
        found.update(glob.glob(pattern, root_dir=ROOT, recursive=True))
    return sorted(found)


def build_cuda() -> bool:
    if os.environ.get("TORCH_AR_CPU_ONLY") == "1":
        return False
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def native_extension():
    sources = project_files("csrc/**/*.cpp")
    # With ninja (the default) every build_ext runs ninja, which recompiles
    # only the objects whose sources or included headers changed, then
    # relinks. The headers are listed for the slower non-ninja fallback.
    depends = project_files("csrc/**/*.h", "kernels/**/*.h", "kernels/**/*.cuh")
    # C++20: the headers of torch releases after 2.11 require it (2.11 accepts it).
    # -fopenmp: at::parallel_for is an inline OpenMP loop that runs serially in
    # code compiled without it. Only compiled with it: the OpenMP calls bind,
    # when the library loads, to the runtime torch itself loaded (linking our
    # own would put a second OpenMP runtime in the process).
    # -ffp-contract=off: a * b + c stays two roundings even where CFLAGS allow
    # FMA, so the CPU kernels round as the CUDA ones do (ops/relax_math.h).
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-Wno-unknown-pragmas"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    # What `torch_ar.selftest` reports as the build's GPU architectures; no
    # spaces or semicolons, which the compile command would split.
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if build_cuda() else ""
    archs = ",".join(archs.replace(";", " ").split())
    cxx_flags = cxx_flags + [f"-DTORCH_AR_BUILD_ARCHS={archs}"]
    if build_cuda():
        return CUDAExtension(
            name="torch_ar._C",
            sources=sources + project_files("kernels/**/*.cu"),
            depends=depends,
            include_dirs=include_dirs,
            define_macros=[("TORCH_AR_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++20"]},
        )
    return CppExtension(
        name="torch_ar._C",
        sources=sources,
        depends=depends,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
    )


def torch_requirement() -> str:
    """The torch release this build is compiled against: a wheel built here
    loads only into that minor release (the C++ ABI changes between them)."""
    major, minor = torch.__version__.split("+", 1)[0].split(".")[:2]
    return f"torch~={major}.{minor}.0"


# Everything declarative is in pyproject.toml; this file holds what must be
# code: the extension and the torch release it was built against.
setup(
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=[torch_requirement(), "numpy>=1.24"],
    zip_safe=False,
)
