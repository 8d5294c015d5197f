VENV ?= .venv
.PHONY: bootstrap demo test bench

bootstrap:
	@scripts/bootstrap

# Run the gateway on its embedded default: embedded Redis, demo fleet of local
# vLLM CPU workers, gateway on http://127.0.0.1:8000/v1
demo: bootstrap
	$(VENV)/bin/switchyard serve --demo

# Run the whole test suite (what CI runs)
test: bootstrap
	$(VENV)/bin/python -m pytest -ra $(PYTEST_ARGS)

bench: bootstrap
	$(VENV)/bin/python benchmarks/gateway_overhead.py
