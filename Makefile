# Single entry point. `make demo` runs the main job, `make test` the tests;
# both install what they need first (torch, build tools) and build the extension.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH_SPEC ?= torch
# CUDA kernels are compiled whenever nvcc is found (even without a GPU).
HAVE_NVCC := $(shell (command -v nvcc || test -x $${CUDA_HOME:-/usr/local/cuda}/bin/nvcc && echo yes) 2>/dev/null)
OUT ?= gpu-check-out
DEMO_ARGS ?=
CMAKE_BUILD ?= build/cmake-cpu

.PHONY: deps build test bench bench-comm demo gpu-check cmake-cpu cmake-cuda clean

deps:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -q ninja pybind11 numpy pytest pytest-benchmark
	$(PIP) install -q scikit-learn pyyaml tqdm matplotlib tensorboard

build: deps
	$(PIP) install --no-build-isolation --no-deps -e .
	@$(PYTHON) -c "import deepseek_kernels as d; print('build_info:', d.build_info())"

test: build
	DSK_EXPECT_CUDA_KERNELS=$(if $(HAVE_NVCC),1,0) $(PYTHON) -m pytest tests -q

bench: build
	$(PYTHON) bench/bench_quant.py
	$(PYTHON) bench/bench_moe.py
	$(PYTHON) bench/bench_gemm.py
	$(PYTHON) bench/bench_attention.py
	$(PYTHON) bench/bench_host.py

bench-comm: build
	$(PYTHON) bench/bench_comm.py

# The main job: train the multimodal MoE model on the digits VQA task (model/),
# print the progress bar, tokens/s and the validation accuracy; CUDA when present.
demo: build
	$(PYTHON) -m model.train $(DEMO_ARGS)

gpu-check:
	bash bench/gpu_check.sh $(OUT)

cmake-cpu: deps
	cmake -S . -B $(CMAKE_BUILD) -DPython3_EXECUTABLE=$$(command -v $(PYTHON))
	cmake --build $(CMAKE_BUILD) -j$$(nproc)

cmake-cuda: deps
	cmake -S . -B build/cmake-cuda -DDSK_WITH_CUDA=ON -DPython3_EXECUTABLE=$$(command -v $(PYTHON))
	cmake --build build/cmake-cuda -j$$(nproc)

clean:
	rm -rf build dist *.egg-info deepseek_kernels/_C*.so
