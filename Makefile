# The two commands a new user needs: `make test` and `make bench`. Both set everything up
# from scratch (virtual environment, torch, build) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
TORCH_VERSION ?= 2.14.1
export MAX_JOBS ?= 2

.PHONY: test bench demo build soak clean

$(DEPS):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==$(TORCH_VERSION) ninja pybind11 pytest hypothesis numpy matplotlib psutil scikit-learn
	touch $(DEPS)

# Builds kdkernels._C (C++ CPU) always and kdkernels._C_cuda when nvcc + a CUDA torch are present
# (KDKERNELS_SKIP_CUDA=1 skips it). --no-build-isolation: an isolated build would fetch another torch.
build: $(DEPS)
	$(PY) -m pip install -q -e . --no-build-isolation

test: build
	$(PY) -m pytest python_tests -q

# Longer property-test run (hundreds of examples per test).
soak: build
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest python_tests -q

# Options go through BENCH_ARGS, e.g. make bench BENCH_ARGS="--losses rkd --no-scaling"
BENCH_ARGS ?=
bench: build
	$(PY) -m kdkernels.bench $(BENCH_ARGS)

# End-to-end distillation on scikit-learn's digits (a few minutes on 2 cores): prints accuracies and
# the loss-step time kdkernels vs eager, writes demo_out/results.json and demo_out/learning_curves.png.
demo: build
	$(PY) -m pip install -q scikit-learn
	$(PY) -m kdkernels.demo

clean:
	rm -rf build *.egg-info kdkernels/*.so bench_out .hypothesis .pytest_cache
