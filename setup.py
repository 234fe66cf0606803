"""Build deepseek_kernels._C with torch.utils.cpp_extension.

    pip install --no-build-isolation .        (or -e . for development)

Knobs (environment variables):
    DSK_FORCE_CUDA=1      build the CUDA kernels (error if nvcc or a CUDA torch is missing)
    DSK_DISABLE_CUDA=1    CPU-only build
    TORCH_CUDA_ARCH_LIST  e.g. "8.0;9.0a" (default: sm_80 and sm_90a, plus compute_80 PTX)
    MAX_JOBS              parallel compile jobs (ninja)
    CUDA_HOME             CUDA toolkit (default: nvcc on PATH, then /usr/local/cuda)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import site
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _resolve_cuda_home() -> None:
    """Set CUDA_HOME when unset: torch guesses dirname(dirname(which nvcc)), which is
    wrong when nvcc on PATH is a wrapper script (e.g. /usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) and os.path.exists(
                os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_resolve_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover
    sys.exit(
        "deepseek_kernels builds against your installed torch: install torch first, then run "
        "'pip install --no-build-isolation .' (build isolation would hide torch)."
    )


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _nvcc_version(cuda_home: str | None):
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _want_cuda() -> bool:
    if _flag("DSK_DISABLE_CUDA"):
        return False
    nvcc = _nvcc_version(CUDA_HOME)
    torch_cuda = torch.version.cuda
    forced = _flag("DSK_FORCE_CUDA")
    if nvcc is None or torch_cuda is None:
        if forced:
            why = "nvcc was not found (set CUDA_HOME)" if nvcc is None else (
                f"torch {torch.__version__} is a CPU-only build (install a CUDA build of torch)")
            sys.exit(f"DSK_FORCE_CUDA=1 but {why}.")
        print("deepseek_kernels: building CPU kernels only "
              f"(nvcc: {nvcc}, torch CUDA: {torch_cuda})", file=sys.stderr)
        return False
    t_major, t_minor = (int(v) for v in torch_cuda.split(".")[:2])
    if nvcc[0] < 12:
        sys.exit(f"deepseek_kernels: the CUDA kernels need CUDA >= 12.0 (Hopper tensor maps / "
                 f"TMA); nvcc at {CUDA_HOME} is {nvcc[0]}.{nvcc[1]}. Build CPU-only with "
                 "DSK_DISABLE_CUDA=1.")
    if nvcc[0] != t_major:
        sys.exit(
            f"CUDA version mismatch: nvcc at {CUDA_HOME} is {nvcc[0]}.{nvcc[1]} but torch "
            f"{torch.__version__} was built with CUDA {torch_cuda}. Point CUDA_HOME at a CUDA "
            f"{t_major}.x toolkit, install a torch built for CUDA {nvcc[0]}.x, or build CPU-only "
            "with DSK_DISABLE_CUDA=1.")
    if nvcc[1] != t_minor:
        print(f"deepseek_kernels: note: nvcc {nvcc[0]}.{nvcc[1]} vs torch CUDA {torch_cuda} "
              "(same major version: compatible)", file=sys.stderr)
    return True


def _cuda_arch_flags():
    """(nvcc -gencode flags, architecture names for build_info)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not env:
        flags = ["-gencode=arch=compute_80,code=sm_80",
                 "-gencode=arch=compute_90a,code=sm_90a",
                 "-gencode=arch=compute_80,code=compute_80"]
        return flags, ["sm_80", "sm_90a", "compute_80"]
    flags, names = [], []
    for arch in re.split(r"[;\s,]+", env):
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        arch = arch.replace("+PTX", "")
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        names.append(f"sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            names.append(f"compute_{num}")
    if "sm_90a" in names and "sm_90" in names:
        # Both run on the same GPUs (compute capability 9.0), and nothing says which
        # one the driver loads; from sm_90 the wgmma kernels would trap. sm_90a only.
        print("deepseek_kernels: note: TORCH_CUDA_ARCH_LIST has 9.0 and 9.0a: no sm_90 code "
              "(sm_90a runs on the same GPUs)", file=sys.stderr)
        flags.remove("-gencode=arch=compute_90,code=sm_90")
        names.remove("sm_90")
    return flags, names


def _pip_cuda_include_dirs():
    """Headers of the CUDA libraries that pip's CUDA torch brings (nvidia/cu13/include:
    cuBLAS, cuSPARSE, ...). Only the cu*/include folders, searched after the toolkit's
    own headers (-idirafter; -isystem for nvcc), so they never shadow the compiler's or the toolkit's."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu[0-9]*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _sources(with_cuda: bool):
    # One source list for every build: setup.py and CMakeLists.txt both glob csrc/.
    cpp = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    cu = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
    stems = [os.path.splitext(os.path.basename(f))[0] for f in cpp + cu]
    clash = {s for s in stems if stems.count(s) > 1}
    if clash:
        sys.exit(f"source files share a basename (their objects would collide): {sorted(clash)}")
    return cpp + (cu if with_cuda else [])


def _extension():
    with_cuda = _want_cuda()
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need
    # (C++17 for torch <= 2.12, C++20 after); a mismatch miscompiles across the ABI.
    # -ffp-contract=off: no FMA contraction, so CPU results match the GPU and the
    # reference bitwise. -fno-trapping-math: float selects vectorize (values
    # unchanged). -fopenmp: at::parallel_for is an inline OpenMP loop.
    cxx = ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fopenmp", '-DDSK_BUILD_SYSTEM="setuptools"']
    link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        arch_flags, arch_names = _cuda_arch_flags()
        cxx += ["-DDSK_WITH_CUDA", f'-DDSK_CUDA_ARCHS="{";".join(arch_names)}"']
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "--fmad=true",
                "-DDSK_WITH_CUDA", "--threads=2"] + arch_flags
        pip_includes = _pip_cuda_include_dirs()
        cxx += [f for d in pip_includes for f in ("-idirafter", d)]
        nvcc += [f for d in pip_includes for f in ("-isystem", d)]
        return CUDAExtension(
            "deepseek_kernels._C", _sources(True), include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)
    return CppExtension(
        "deepseek_kernels._C", _sources(False), include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx}, extra_link_args=link)


class _BuildExt(BuildExtension):
    def build_extensions(self):
        # Some Python builds link extensions with -static-libstdc++ (sysconfig's
        # LDSHARED): a private copy of libstdc++'s iostreams then meets the shared
        # one torch uses, and formatting a number in an error message crashes.
        for attr in ("linker_so", "linker_so_cxx"):
            cmd = getattr(self.compiler, attr, None)
            if cmd:
                setattr(self.compiler, attr, [a for a in cmd if a != "-static-libstdc++"])
        super().build_extensions()


setup(
    name="deepseek-kernels",
    version="0.1.0",
    description="Hand-written CPU/CUDA kernels for DeepSeek-style models, as torch ops",
    packages=find_packages(include=["deepseek_kernels", "deepseek_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": _BuildExt.with_options(use_ninja=True)},
    python_requires=">=3.9",
    zip_safe=False,
)
