# Two commands for a newcomer: `make demo` and `make test`. Both create .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so that machines with a local CPU wheel take it (an unpinned torch pulls a
# multi-GB CUDA build). Override on GPU clusters: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev system-deps demo test clean

# pip byte-compiles every installed file one at a time: a fresh `make install-dev` took 157-173 s with it
# and 113-115 s without, compiling afterwards on every core (COMPILE) instead. COMPILE skips the packages'
# own test suites and transformers' ~2,600 model files (the tests load one model, which Python then compiles
# in memory at import: the same import time, measured): 31 s instead of 47 s for all 22,600 files. One file in
# torch's test helpers is Python-3.12-only syntax and fails, as it does under pip: the exit code is ignored.
# It compiles this project's own packages too: where PYTHONDONTWRITEBYTECODE is set (it is in our dev machine's shell),
# every Ray worker would otherwise compile the stage modules it imports, 0.07-0.12 CPU s per process.
PIP_INSTALL := $(BIN)/pip install --no-compile
COMPILE := $(BIN)/python -m compileall -q -j 0 -x '/tests/|/transformers/models/' $(VENV)/lib pipelines clip_model >/dev/null 2>&1 || true

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip wheel setuptools

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e .
	$(COMPILE)
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[demo]'
	$(COMPILE)
	touch $@

# Not on top of .installed: one pip resolution and one compile pass for `make test` on a fresh clone (a
# second pass only to find everything up to date costs ~7 s); it marks the base install done as well.
$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) -e '.[dev]'
	# OpenAI's CLIP and open_clip, used only by the tests as independent reference implementations.
	# --no-deps: it asks for torchvision, which does not import beside a CPU torch wheel; the tests
	# load its model.py and simple_tokenizer.py, which need only torch, ftfy and regex.
	$(PIP_INSTALL) --no-deps openai-clip==1.0.1 open_clip_torch==3.3.0
	$(COMPILE)
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed-demo
	$(BIN)/python -m pipelines.demo $(ARGS)

# Debian packages the tests need: chromium renders the HTML run report (tests/test_report.py).
# Uses sudo only when not root; fails with a message when neither is possible.
system-deps:
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; \
	  elif command -v sudo >/dev/null; then SUDO=sudo; \
	  else echo "system-deps: need root or sudo to apt-get install chromium (or install it yourself)" >&2; exit 1; fi; \
	  $$SUDO apt-get update && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium; }

test: $(VENV)/.installed-dev system-deps
	# Two workers, one test module at a time each (module fixtures run once); each worker has its own shared
	# Ray and S3 server (tests/conftest.py).
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --durations=15

clean:
	rm -rf $(VENV)
