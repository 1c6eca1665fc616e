# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# sam2 (sam=sam2.1_*) is an sdist whose build imports torch: built against the installed torch,
# without its CUDA extension, before the extras ask for it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1 'setuptools>=77.0.3'
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --quiet --no-build-isolation sam2==1.1.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m usam.fit experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs
