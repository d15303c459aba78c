# Two entry points, both setting up .venv first: `make demo` and `make test` (see README.md).
VENV := .venv
BIN := $(VENV)/bin
DEFAULT_CHECKPOINT := models/checkpoints/sdgraph-tiny.safetensors
DEMO_CHECKPOINT := models/checkpoints/sdgraph-demo.safetensors

.PHONY: demo test setup lint browser bench bench-memory bench-precision parity

setup: $(VENV)/.installed

# torch is installed first and pinned, so no other requirement can pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,ray]' torch==2.13.0
	# spandrel (upscale models) without its torchvision requirement, which would replace our CPU torch
	$(BIN)/pip install -q --no-deps spandrel==0.4.2
	touch $@

$(DEFAULT_CHECKPOINT): | $(VENV)/.installed
	$(BIN)/sdgraph make-checkpoint $@ --preset tiny --seed 0

# The demo model is committed (docs/demo-model.md; `sdgraph train-demo` retrains it): nothing is generated here.
demo: $(VENV)/.installed $(DEMO_CHECKPOINT)
	$(BIN)/sdgraph run graphs/txt2img.json

lint: $(VENV)/.installed
	$(BIN)/ruff check .

# The browser tests (tests/browser) drive Debian's chromium with Playwright (which cannot download its own
# browsers here); CI runs as root, so it is installed when missing.
browser:
	command -v chromium >/dev/null 2>&1 || (apt-get update -q && apt-get install -y -q chromium)

# Two pytest-xdist workers with one torch thread each; a worker takes a whole file, or a group of tests sharing
# the full-size checkpoint, a Ray cluster or the browser (tests/conftest.py, docs/testing.md).
test: $(VENV)/.installed lint browser
	$(BIN)/pytest -n 2

# ComfyUI's reference images were made in fp32, and --dtype fp32 reproduces them exactly (maximum difference 0).
# The default precision on CPUs with native bf16 (about 2x faster, within 1% of fp32 per UNet call) also passes
# the kit's bar, but is not pixel-identical (99.95% and 99.98% of values within 2/255, 51 dB).
parity: $(VENV)/.installed
	$(BIN)/python ../shared/reference/parity/check.py --cmd "$(BIN)/sdgraph run {workflow} --out {out} --dtype fp32"

# Full-size SD1.5 (generated weights): sdgraph fp32 / default vs diffusers fp32 / bf16, seconds per step,
# decode, load and peak RSS (several minutes; docs/performance.md).
bench: $(VENV)/.installed
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/sd15_step.py

bench-memory: $(VENV)/.installed
	$(BIN)/python bench/memory.py

bench-precision: $(VENV)/.installed
	$(BIN)/python bench/precision.py
