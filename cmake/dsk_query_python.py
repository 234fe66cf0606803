"""Report what CMakeLists.txt needs to know about a Python environment.

Run by cmake/DskPython.cmake with the interpreter that has torch installed.
Prints one ``key=value`` per line (keys may repeat):

    torch_cmake_prefix_path=<torch.utils.cmake_prefix_path>
    torch_version=<torch.__version__>
    torch_cuda_version=<torch.version.cuda, empty for a CPU-only torch>
    nvidia_dir=<a folder of the ``nvidia`` namespace package (pip's CUDA wheels)>
    error=<why torch could not be imported>

Exits 0 even when torch is missing: CMake decides what is fatal.
"""

import importlib.util
import sys


def main() -> int:
    try:
        import torch
    except Exception as exc:  # torch missing or broken: report, let CMake decide
        print(f"error=cannot import torch with {sys.executable}: {exc}")
    else:
        print(f"torch_cmake_prefix_path={torch.utils.cmake_prefix_path}")
        print(f"torch_version={torch.__version__}")
        print(f"torch_cuda_version={torch.version.cuda or ''}")

    try:
        spec = importlib.util.find_spec("nvidia")
    except Exception:
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            print(f"nvidia_dir={folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
