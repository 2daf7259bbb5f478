# The README's two commands: `make demo` and `make test`. Both set up .venv first.
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
RUNTIME ?=

.PHONY: setup test demo bench clean

setup:
	@bash tools/setup_venv.sh

test: setup
	@bash tools/run_tests.sh $(PYTEST_ARGS)

demo: setup
	@$(BIN)/refvlm demo $(if $(RUNTIME),--runtime $(RUNTIME))

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) build install log ros_ws/build ros_ws/install ros_ws/log .pytest_cache
