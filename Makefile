# The two commands of the README. Both build .venv first; the install reuses any torch
# already importable (system site-packages are visible to the venv) and otherwise takes the
# pinned CPU wheel, so a resolver never pulls a second, multi-GB CUDA torch.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_MIN ?= 2.1
HOST ?= 127.0.0.1
PORT ?= 8000
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS ?= 1

.PHONY: install serve test bench clean

$(VENV)/.installed: setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch, sys; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(v < tuple(int(x) for x in '$(TORCH_MIN)'.split('.')))" 2>/dev/null \
		|| $(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(PY) -c "import torch; print('torch=='+torch.__version__)" > $(VENV)/constraints.txt
	$(PY) -m pip install --quiet --constraint $(VENV)/constraints.txt -e ".[worker,test,bench]"
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/batchwire serve --host $(HOST) --port $(PORT)

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) -m benchmarks.run

clean:
	rm -rf $(VENV) build *.egg-info
