# Entry points: `make demo`, `make test` (lint + the whole suite), `make test-fast`, `make lint`.
# Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO := demo
# make demo's sizes; the quick variant (~2 min on 2 cores): make demo EPOCHS=1 IMAGES=24
EPOCHS ?= 6
IMAGES ?= 60
LIMIT_BATCHES ?= 0

.PHONY: demo test test-fast lint gpu-check gpu-bundle clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	# Synthetic photos with ground truth (COCO) and, from the same photos, a folder of proposal crops.
	$(PY) tools/make_demo_data.py $(DEMO)/proposals --images $(IMAGES) --proposals-per-image 40 --seed 0 \
		--photos $(DEMO)/photos --formats coco
	# The crop-folder path: pack it into shards (the original's folder, as users have it).
	$(PY) tools/pack.py $(DEMO)/proposals --out $(DEMO)/shards --samples-per-shard 1000
	# The photo path: R-CNN's proposal stage straight into shards (no crop folder on disk).
	$(PY) tools/propose.py $(DEMO)/photos/coco --format coco --out $(DEMO)/shards-photos --max-proposals 300 \
		--negatives-per-image 40 --gt-jitter 4
	# A small architecture from scratch so the demo runs on 2 CPU cores without downloads;
	# the trainer's defaults stay the original's (ResNeXt50, ImageNet weights). Each epoch validates on the
	# original's cut (every positive + the 200 hardest negatives); the test split is scored whole.
	$(PY) -m train --shards $(DEMO)/shards-photos --arch shufflenet_v2_x0_5 --weights none --head linear \
		--lr 2e-3 --pos-weight 3 --epochs $(EPOCHS) --patience 3 --target-recall 0.8 --limit-batches $(LIMIT_BATCHES) \
		--val-sampler hard-negatives --val-negatives 200 --out $(DEMO)/run
	# Detection on the held-out photos (the pack's test split, as the proposal stage recorded it): boxes, annotated
	# pictures, AP against the ground truth beside baselines without the network.
	$(PY) -m train detect --checkpoint $(DEMO)/run/best.pt --split test --out $(DEMO)/detect
	@echo "annotated photos: $(DEMO)/detect/images/, contact sheet: $(DEMO)/detect/overview.jpg"

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy crackio train tools

# pytest-xdist's workers: the cores this process may use, at most 4 (tests start processes of their own).
JOBS ?= $(shell $(PYTHON) -c "import os; print(min(4, len(os.sched_getaffinity(0))))")

test: lint
	$(PY) -m pytest -q -n $(JOBS)

# Everything but the multi-process and end-to-end tests (marked slow): under a minute on 2 cores.
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) -m "not slow"

# On a machine with an NVIDIA GPU: CUDA tests, GPU benchmark rows, ResNeXt50 training and detection on the GPU
# (~8 min); says so without one. On a lent GPU machine without network: docs/gpu.md.
gpu-check: $(VENV)/.installed
	$(PY) tools/gpu_check.py

# Here: the wheels the GPU machine lacks (Python 3.12, CUDA 13) in parts of <= 56 MiB under gpu-bundle/part-NN/.
gpu-bundle: $(VENV)/.installed
	$(PY) tools/gpu_bundle.py --out gpu-bundle

clean:
	rm -rf $(DEMO) runs .pytest_cache
