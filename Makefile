# Two commands do all set-up on a fresh machine:
#   make run    synthetic default NOVA -> an image and a video under outputs/
#   make test   the test suite (CPU)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: setup run test clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[onnxruntime,test,serve]"
	touch $(STAMP)

setup: $(STAMP)

# Build engines for the embedded default (synthetic tiny NOVA, image and video), then generate through
# the runner. Unchanged engines are reused on later runs.
run: setup
	$(BIN)/python export/build_engines.py --synthetic tiny-t2i --precision fp16
	$(BIN)/python -m runtime generate --engines engines/tiny-t2i-fp16 --prompt "a watercolor fox in a snowy forest" --out outputs/tiny-t2i.png
	$(BIN)/python export/build_engines.py --synthetic tiny-t2v --precision fp16
	$(BIN)/python -m runtime generate --engines engines/tiny-t2v-fp16 --max-latent-length 9 --prompt "waves rolling onto a beach" --out outputs/tiny-t2v.mp4

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf outputs checkpoints engines/*/ .pytest_cache
