# Two entry points, both setting up .venv first: `make demo` and `make test` (see README.md).
VENV := .venv
BIN := $(VENV)/bin
DEFAULT_CHECKPOINT := models/checkpoints/sdgraph-tiny.safetensors
DEMO_CHECKPOINT := models/checkpoints/sdgraph-demo.safetensors

.PHONY: demo test setup lint bench parity

setup: $(VENV)/.installed

# torch is installed first and pinned, so no other requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]' torch==2.13.0
	touch $@

$(DEFAULT_CHECKPOINT): | $(VENV)/.installed
	$(BIN)/sdgraph make-checkpoint $@ --preset tiny --seed 0

# The demo model is committed (docs/demo-model.md; `sdgraph train-demo` retrains it): nothing is generated here.
demo: $(VENV)/.installed $(DEMO_CHECKPOINT)
	$(BIN)/sdgraph run graphs/txt2img.json

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: $(VENV)/.installed lint
	$(BIN)/pytest

parity: $(VENV)/.installed
	$(BIN)/python ../shared/reference/parity/check.py
