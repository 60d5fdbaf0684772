# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo

.PHONY: demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) tools/make_demo_data.py $(DEMO)/proposals --images 60 --proposals-per-image 40 --seed 0
	$(PY) tools/pack.py $(DEMO)/proposals --out $(DEMO)/shards --samples-per-shard 1000
	rm -rf $(DEMO)/run
	# A small architecture from scratch so the demo runs on 2 CPU cores without downloads;
	# the trainer's defaults stay the original's (ResNeXt50, ImageNet weights).
	$(PY) -m train --shards $(DEMO)/shards --arch shufflenet_v2_x0_5 --weights none --head linear \
		--lr 2e-3 --pos-weight 3 --epochs 6 --patience 3 --target-recall 0.8 --out $(DEMO)/run

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMO) runs .pytest_cache
