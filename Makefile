# The two commands a newcomer needs: `make run` and `make test`.
PY := .venv/bin/python
export PYTHONDONTWRITEBYTECODE := 1

.PHONY: setup run test test-fast bench bench-soak doctor clean

setup:
	@scripts/setup.sh

run: setup
	$(PY) -m qtap_devtools run $(ARGS)

doctor: setup
	$(PY) -m qtap_devtools doctor

test: setup
	$(PY) -m pytest -ra --durations=10 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -ra -m "not kernel and not docker and not browser" $(PYTEST_ARGS)

bench: setup
	$(PY) -m bench.run $(ARGS)

bench-soak: setup
	$(PY) -m bench.soak $(ARGS)

clean:
	rm -rf .venv .cache .pytest_cache .hypothesis .mypy_cache test-output build
	find qtap_devtools -name "*.so" -delete
