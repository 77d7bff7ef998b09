# `make test` and `make demo` work on a fresh machine: they create/reuse .venv and install what is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cksum setup.py | cut -d' ' -f1)

.PHONY: test demo install benchmarks clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-* && touch $@

test: $(STAMP)
	$(PY) -m pytest tests -q

demo: $(STAMP)
	$(PY) examples/finetune.py --overwrite

benchmarks: $(STAMP)
	$(PY) benchmarks/samplers.py
	$(PY) benchmarks/unet_vs_diffusers.py
	$(PY) benchmarks/ops.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/guidance.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
