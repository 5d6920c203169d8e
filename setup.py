"""Builds torch_ar._C, the native operators of torch_ar.

torch must already be installed (build with `pip install --no-build-isolation
-e .` or `python setup.py build_ext --inplace`).

CUDA sources (kernels/**/*.cu) are compiled when torch itself has CUDA and a
CUDA toolkit is found, or when FORCE_CUDA=1; whether a GPU is visible does not
matter. TORCH_AR_CPU_ONLY=1 skips them. TORCH_CUDA_ARCH_LIST defaults to 9.0
and MAX_JOBS to 2.
"""

import glob
import os

from setuptools import find_packages, setup

os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
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
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-Wno-unknown-pragmas"]
    include_dirs = [os.path.join(ROOT, "csrc")]
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


setup(
    name="torch_ar",
    version="0.1.0",
    description="Gradients by Activation Relaxation for PyTorch",
    packages=find_packages(include=["torch_ar", "torch_ar.*"]),
    python_requires=">=3.10",
    ext_modules=[native_extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
