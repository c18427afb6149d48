PYTHON ?= python
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
MYSQL_URL ?= mysql+pymysql://root@127.0.0.1:3306/test
BENCH_ARGS = --pg-url '$(PG_URL)' --mysql-url '$(MYSQL_URL)'

.PHONY: test test-full lint bench bench-full bench-deps

# The fast default run (no slow, no scheduler, e2e on the SQLite ledger only).
test:
	$(PYTHON) -m pytest

# Every tier on every database, as CI runs it (two workers).
test-full:
	$(PYTHON) -m pytest -m "" -n 2 --dist loadgroup

# The gates CI runs before the tests.
lint:
	ruff check .
	ruff format --check .
	mypy --strict exclusive_xcom
	mypy tests benchmarks example_dags

# The quick variant of every case (about 2.5 minutes); results in benchmarks/results/quick/.
bench: bench-deps
	$(PYTHON) -m benchmarks --quick $(BENCH_ARGS) --out benchmarks/results/quick

# The full run (about 15 minutes on 2 cores); results in benchmarks/results/.
bench-full: bench-deps
	$(PYTHON) -m benchmarks $(BENCH_ARGS) --out benchmarks/results

bench-deps:
	@$(PYTHON) -c "import pgqueuer, matplotlib, psycopg, pymysql, redis" 2>/dev/null || $(PYTHON) -m pip install -e '.[bench]'
