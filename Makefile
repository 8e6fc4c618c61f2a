# The README's two commands: `make demo` (the whole job on real data: prepare, embed, train, eval)
# and `make test` (lint, the docs site's strict build, the test suite).
# Both set themselves up on a fresh machine (scripts/setup.sh).
PY := .venv/bin/python
CLI := .venv/bin/rela-pipeline
DATA := data/fashion-mnist
RUN := runs/demo

.PHONY: setup lint docs test demo bench gpu-check budget-table clean

setup:
	@bash scripts/setup.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# The docs site (mkdocs.yml, docs/) into site/; --strict: a broken link or a missing page fails.
docs: setup
	.venv/bin/mkdocs build --strict --site-dir site

test: lint docs
	$(PY) -m pytest -q

demo: setup
	@bash scripts/fashion_mnist_source.sh
	@[ -d $(DATA)/test ] || $(CLI) prepare fashion-mnist --out $(DATA)
	$(CLI) embed --data $(DATA)/train --prior random:resnet18 --image-size 64 --out $(RUN)/shards --overwrite
	$(CLI) inspect $(RUN)/shards
	$(CLI) verify $(RUN)/shards
	$(CLI) train --shards $(RUN)/shards --out $(RUN)/byol-rela --method byol --backbone convnet --epochs 5 --data-ratio 0.1 --overwrite
	$(CLI) eval --checkpoint $(RUN)/byol-rela/backbone.pt --train $(DATA)/train --test $(DATA)/test --json $(RUN)/eval.json

bench: setup
	$(PY) -m pip install --isolated -q --disable-pip-version-check -e ".[bench]"
	@bash scripts/fashion_mnist_source.sh
	@[ -d $(DATA)/test ] || $(CLI) prepare fashion-mnist --out $(DATA)
	$(PY) benchmarks/embed_throughput.py --data $(DATA)/train --image-size 64 --out $(RUN)/embed_throughput.json
	@[ -f $(RUN)/shards/manifest.json ] || $(CLI) embed --data $(DATA)/train --prior random:resnet18 --image-size 64 --out $(RUN)/shards --overwrite
	$(PY) benchmarks/views_cost.py --out $(RUN)/views_cost.json
	$(PY) benchmarks/train_throughput.py --shards $(RUN)/shards --backbone convnet --image-size 32 --batch-size 128 --out $(RUN)/train_throughput.json

# The GPU check (benchmarks/gpu_check.py): every CUDA path of both stages, under 8 minutes on one GPU.
# For a machine with CUDA, torch and the dependencies already installed and no network: no set-up,
# the package is imported from this checkout.
GPU_PY ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out runs/gpu-check.json

# The accuracy-against-budget table with floors and the convergence study (README "Evidence"); about 2 hours on 2 CPU cores, resumable.
# Rerunning resumes: finished runs are kept.
budget-table: setup
	@bash scripts/fashion_mnist_source.sh
	$(PY) benchmarks/budget_table.py --profile cpu --out runs/budget-cpu-plateau

clean:
	rm -rf $(RUN)
