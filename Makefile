# The README's two commands: `make demo` (the main job on real data) and `make test`.
# Both set themselves up on a fresh machine (scripts/setup.sh).
PY := .venv/bin/python
CLI := .venv/bin/rela-pipeline
DATA := data/fashion-mnist
RUN := runs/demo

.PHONY: setup test demo bench clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

demo: setup
	@bash scripts/fashion_mnist_source.sh
	@[ -d $(DATA)/test ] || $(CLI) prepare fashion-mnist --out $(DATA)
	$(CLI) embed --data $(DATA)/train --prior random:resnet18 --image-size 64 --out $(RUN)/shards --overwrite
	$(CLI) inspect $(RUN)/shards
	$(CLI) verify $(RUN)/shards

bench: setup
	@bash scripts/fashion_mnist_source.sh
	@[ -d $(DATA)/test ] || $(CLI) prepare fashion-mnist --out $(DATA)
	$(PY) benchmarks/embed_throughput.py --data $(DATA)/train --image-size 64 --out $(RUN)/embed_throughput.json

clean:
	rm -rf $(RUN)
