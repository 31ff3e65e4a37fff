# Two commands do all set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
DEMO   ?= demo

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade --quiet pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev,tune]'
	touch $@

# Real data for tests and benchmarks: MovieLens-100k as RecBole's PyPI wheel ships it (GroupLens'
# terms, README "Real data"). Set-up may use PyPI; nothing downloads at run time. recbole itself
# is not installed (it pins colorlog and pulls ray, tensorboard, plotly): only its data are used.
RECBOLE  ?= recbole==1.2.1
ML100K    = .cache/data/ml-100k/ml-100k.inter
$(ML100K): $(VENV)/.installed
	$(VENV)/bin/pip download --quiet --no-deps $(RECBOLE) -d .cache/wheels
	$(PY) examples/movielens.py --extract .cache/wheels --src .cache/data/ml-100k

install: $(VENV)/.installed $(ML100K)

# Synthetic data -> trained table DLRM (dlrm's checkpoint format) -> inspect -> profile
# -> rewrite (MD + int8, verified) -> compile (onnx-cpu, torch, tvm-llvm) -> verify -> bench.
RW = $(VENV)/bin/rewrite
demo: $(VENV)/.installed
	$(PY) examples/train_demo.py --out $(DEMO)
	$(RW) inspect $(DEMO)/model.pt
	$(RW) profile $(DEMO)/model.pt --data $(DEMO)/day_0.npz --sample-rate 0.05 \
	    --hot-bytes 256KiB -o $(DEMO)/profile.json --force
	$(RW) apply $(DEMO)/model.pt -p md:energy=0.8 -p quantize:bits=8 --profile $(DEMO)/profile.json \
	    --data $(DEMO)/day_1.npz -o $(DEMO)/small.safetensors --force
	$(RW) inspect $(DEMO)/small.safetensors
	$(RW) compile $(DEMO)/small.safetensors --target onnx-cpu --target torch --target tvm-llvm \
	    -o $(DEMO)/bundle --force
	$(RW) verify $(DEMO)/bundle --data $(DEMO)/day_1.npz
	$(RW) bench $(DEMO)/bundle --batch-sizes 1,64,512,2048 --reference $(DEMO)/model.pt --rounds 3

test: $(VENV)/.installed $(ML100K)
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
