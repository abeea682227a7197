# Two commands for a newcomer: `make demo` and `make test`. Both create .venv if it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned so that machines with a local CPU wheel take it (an unpinned torch pulls a
# multi-GB CUDA build). Override on GPU clusters: make install TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev system-deps demo test clean

# Nothing is byte-compiled at install time (pip --no-compile, uv's default): Python writes each module's .pyc
# the first time any process imports it, so only what runs is compiled, once. For that, the recipes below run
# with PYTHONDONTWRITEBYTECODE unset (it is set in our dev machine's shell): with it set, every process, each Ray
# worker included, compiles every module it imports in memory, again and again. Compiling all 22,600 installed
# files up front took 30 s of a fresh `make install-dev`; an import of torch, Ray Data, Ray Train, DeepSpeed and
# the stage packages from a cold venv compiles 2,841 of them in 9.5 CPU s, once.
unexport PYTHONDONTWRITEBYTECODE
PIP_INSTALL := $(BIN)/pip install --quiet --no-compile
# Everything but torch installs with uv: a fresh clone's `pip install -e '.[dev]'` took 71 + 30 s here, uv 8-11 s for
# the same packages and versions. torch stays with pip, which reads the machine's pip configuration (a local CPU
# wheel, version caps) that uv does not. uv resolves against PyPI, or UV_INDEX_URL / UV_EXTRA_INDEX_URL when set;
# `make test INSTALLER=pip` installs everything with pip instead.
INSTALLER ?= uv
ifeq ($(INSTALLER),uv)
DEPS_INSTALL := $(BIN)/uv pip install --quiet --python $(BIN)/python
else ifeq ($(INSTALLER),pip)
DEPS_INSTALL := $(PIP_INSTALL)
else
$(error INSTALLER must be uv or pip, not '$(INSTALLER)')
endif

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip wheel setuptools $(if $(filter uv,$(INSTALLER)),uv)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(DEPS_INSTALL) -e .
	touch $@

$(VENV)/.installed-demo: $(VENV)/.installed
	$(DEPS_INSTALL) -e '.[demo]'
	touch $@

# Not on top of .installed: one resolution for `make test` on a fresh clone (a second pass only to find
# everything up to date costs seconds); it marks the base install done as well.
$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(DEPS_INSTALL) -e '.[dev]'
	# OpenAI's CLIP and open_clip, used only by the tests as independent reference implementations.
	# --no-deps: it asks for torchvision, which does not import beside a CPU torch wheel; the tests
	# load its model.py and simple_tokenizer.py, which need only torch, ftfy and regex.
	$(DEPS_INSTALL) --no-deps openai-clip==1.0.1 open_clip_torch==3.3.0
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
	# Ray and S3 server (tests/conftest.py), which also orders the modules heaviest first; --no-loadscope-reorder
	# keeps that order (xdist's default puts the modules with most tests first).
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf $(VENV)
