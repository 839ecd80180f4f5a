# The two commands a new user needs: `make test` and `make bench`. Both set everything up
# from scratch (virtual environment, torch, build) on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEPS   := $(VENV)/.deps-installed
PEERS  := $(VENV)/.bench-peers-installed
TORCH_VERSION ?= 2.14.1
export MAX_JOBS ?= 2

.PHONY: test bench demo build soak clean

# First set-up: about 7.5 minutes and 5.6 GB (torch with its CUDA libraries). pip runs without -q so
# every package it collects, downloads and installs is shown as it goes.
$(DEPS):
	@echo "== set-up: virtual environment + torch $(TORCH_VERSION) and test/bench dependencies (first time: ~7.5 min, 5.6 GB)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install torch==$(TORCH_VERSION) ninja pybind11 pytest hypothesis numpy matplotlib psutil scikit-learn
	touch $(DEPS)

# torchdistill: the bench's peer baseline (a bench-time dependency, not a runtime one; the tests of
# the peer use it too). Its losses need torch only, and its declared dependencies (torchvision,
# ...) could replace the pinned torch: --no-deps. Offline, the bench reports it "unavailable" and
# its tests skip, so neither target fails for it.
$(PEERS): $(DEPS)
	$(PY) -m pip install -q --no-deps torchdistill || echo "torchdistill not installed: the bench reports it unavailable"
	touch $(PEERS)

# Builds kdkernels._C (C++ CPU) always and kdkernels._C_cuda when nvcc + a CUDA torch are present
# (KDKERNELS_SKIP_CUDA=1 skips it). --no-build-isolation: an isolated build would fetch another torch.
build: $(DEPS)
	@echo "== build: kdkernels._C (C++ CPU) and, with nvcc, kdkernels._C_cuda (first time on 2 cores: ~10 min; then only what changed)"
	$(PY) -m pip install -q -e . --no-build-isolation
	@echo "== build done"

test: build $(PEERS)
	$(PY) -m pytest python_tests -q

# Longer property-test run (hundreds of examples per test).
soak: build $(PEERS)
	HYPOTHESIS_PROFILE=soak $(PY) -m pytest python_tests -q

# Default: preset cpu (about 2 minutes on 2 cores) or gpu. Options go through BENCH_ARGS, e.g.
# make bench BENCH_ARGS="--preset full", make bench BENCH_ARGS="--losses softmax_kl_div --shape 8192x128000"
BENCH_ARGS ?=
bench: build $(PEERS)
	$(PY) -m kdkernels.bench $(BENCH_ARGS)

# End-to-end distillation on scikit-learn's digits (a few minutes on 2 cores): prints accuracies and
# the loss-step time kdkernels vs eager, writes demo_out/results.json and demo_out/learning_curves.png.
demo: build
	$(PY) -m pip install -q scikit-learn
	$(PY) -m kdkernels.demo

clean:
	rm -rf build *.egg-info kdkernels/*.so bench_out .hypothesis .pytest_cache
