# The README's commands. `make quickstart` and `make test` work on a fresh clone.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
OUT ?= out/quickstart

.PHONY: install quickstart test test-fast lint format bench quality gpu-smoke clean

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(BIN)/sftmix-ray pipeline --config configs/quickstart.yaml --output-dir $(OUT)

test: install
	DS_ACCELERATOR=cpu $(BIN)/pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# The tests that start no Ray cluster and no training run (about a minute).
test-fast: install
	DS_ACCELERATOR=cpu $(BIN)/pytest -q -n 2 -m "not slow" --durations=10

# The GPU code paths at reduced size (FSDP2 bf16 under torchrun, fused losses at a 128k
# vocabulary, batched generation, and the Ray pipeline with FSDP2 and ZeRO-3 on every GPU);
# prints one JSON line per part. Without a GPU it says so and exits 0. Not part of `make test`.
gpu-smoke: install
	$(PY) benchmarks/gpu_smoke.py --json benchmarks/results/gpu_smoke.jsonl

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: install
	DS_ACCELERATOR=cpu $(PY) benchmarks/run.py --quick --json benchmarks/results/run_quick.json

quality: install
	DS_ACCELERATOR=cpu $(PY) benchmarks/quality_study.py --json benchmarks/results/quality_study.json \
		--png benchmarks/results/quality_study.png --seeds 0,1,2,3,4,5,6,7 \
		--set data.demo_eval_size=600 --set eval.max_examples=600

clean:
	rm -rf out .pytest_cache .ruff_cache .mypy_cache
