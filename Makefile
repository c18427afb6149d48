PYTHON ?= python
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test
MYSQL_URL ?= mysql+pymysql://root@127.0.0.1:3306/test
BENCH_ARGS = --pg-url '$(PG_URL)' --mysql-url '$(MYSQL_URL)'

.PHONY: bench bench-full bench-deps

# The quick variant of every case (under 2 minutes); results in benchmarks/results/quick/.
bench: bench-deps
	$(PYTHON) -m benchmarks --quick $(BENCH_ARGS) --out benchmarks/results/quick

# The full run (about 15 minutes on 2 cores); results in benchmarks/results/.
bench-full: bench-deps
	$(PYTHON) -m benchmarks $(BENCH_ARGS) --out benchmarks/results

bench-deps:
	@$(PYTHON) -c "import pgqueuer, matplotlib, psycopg, pymysql" 2>/dev/null || $(PYTHON) -m pip install -e '.[bench]'
