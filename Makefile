# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Synthetic data -> trained table DLRM (dlrm's checkpoint format) -> inspect -> profile.
demo: $(VENV)/.installed
	$(PY) examples/train_demo.py --out $(DEMO)
	$(VENV)/bin/rewrite inspect $(DEMO)/model.pt
	$(VENV)/bin/rewrite profile $(DEMO)/model.pt --data $(DEMO)/day_0.npz --sample-rate 0.05 \
	    --hot-bytes 256KiB -o $(DEMO)/profile.json

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
