# Two commands on a fresh machine: `make finetune` (the main job) and `make test`.
# Both create the virtual environment in .venv first, with everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch build to install; any release in requirements.txt's range works. pip takes it from a local wheel index
# where the machine has one, else downloads it (about 2 minutes on this project's machines, install included).
TORCH ?= torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE ?= 1

.PHONY: install finetune test benchmark clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH) -r requirements-dev.txt
	touch $@

finetune: install
	$(PY) run_finetune.py $(ARGS)

test: install
	$(PY) -m pytest tests

benchmark: install
	$(PY) benchmarks/benchmark_speed.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
