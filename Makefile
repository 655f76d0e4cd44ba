# The two commands a newcomer needs: `make run` (the demo) and `make test` (the suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint bytecode unit integration bench bench-patroni chaos chaos-snapshots soak fuzz-api system-deps venv clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

system-deps: $(STAMP)
	./scripts/system-deps.sh

venv: $(STAMP)

run: $(STAMP) system-deps bytecode
	$(BIN)/repstage-mesh demo

# Our modules compiled ahead: every `serve`, xDS worker and CLI call the tests and the demo start
# imports them, and with PYTHONDONTWRITEBYTECODE set (as on our CI machines) Python would compile
# them again in every process (~0.8 s of CPU per node start). Only changed files are compiled.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q repstage_mesh xds filters integration bench > /dev/null

# ruff, mypy, the layer contracts of ARCHITECTURE.md (pyproject.toml [tool.importlinter]),
# and the size limits (scripts/check_sizes.py).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy repstage_mesh
	$(BIN)/lint-imports --no-cache
	$(BIN)/python scripts/check_sizes.py

# The suite in two phases: everything not marked `serial` on TEST_WORKERS pytest-xdist workers,
# then the `serial` tests (timing windows that need the cores: pyproject.toml, markers) one at
# a time. Both phases always run; the target fails if either did.
TEST_WORKERS ?= 2
NOT_IN_TEST := not soak and not consul_agent and not chaos
test: $(STAMP) system-deps lint bytecode
	@rc=0; \
	$(BIN)/pytest -q -ra --durations=15 -n $(TEST_WORKERS) -m "not serial and $(NOT_IN_TEST)" || rc=$$?; \
	$(BIN)/pytest -q -ra --durations=15 -m "serial and $(NOT_IN_TEST)" || rc=$$?; \
	exit $$rc

unit: $(STAMP)
	$(BIN)/pytest -q tests

integration: $(STAMP) system-deps bytecode
	$(BIN)/pytest -q integration

# The chaos suite (integration/test_chaos.py, issue 12): CHAOS_ROUNDS random faults under traffic
# on namespaced nodes (root, Linux); writes its table and plot to bench/RESULTS.md. A short
# version (3 rounds) runs in `make test`. Replay rounds with CHAOS_SEEDS=s1,s2.
# It also runs the snapshot chaos (integration/test_snapshot_chaos.py, issue 16): SNAPSHOT_CHAOS_RUNS
# kill -9s of the Redis primary spread over the phases of a snapshot; `make chaos-snapshots` runs
# it alone (no root needed); SNAPSHOT_CHAOS_WRITE=1 writes its table to bench/RESULTS.md.
CHAOS_ROUNDS ?= 100
SNAPSHOT_CHAOS_RUNS ?= 20
chaos: $(STAMP) system-deps
	CHAOS_ROUNDS=$(CHAOS_ROUNDS) SNAPSHOT_CHAOS_RUNS=$(SNAPSHOT_CHAOS_RUNS) $(BIN)/pytest -q -s -m chaos \
		integration/test_chaos.py integration/test_snapshot_chaos.py

chaos-snapshots: $(STAMP) system-deps
	SNAPSHOT_CHAOS_RUNS=$(SNAPSHOT_CHAOS_RUNS) $(BIN)/pytest -q -s -m chaos integration/test_snapshot_chaos.py

# The xDS protocol state machines, run long (the suite runs 100 examples of 30 steps each).
SOAK_EXAMPLES ?= 600
soak: $(STAMP)
	PROTOCOL_EXAMPLES=$(SOAK_EXAMPLES) PROTOCOL_STEPS=40 $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_xds_protocol.py -k "TestSotwProtocol or TestDeltaProtocol"

# The benchmarks behind bench/RESULTS.md (minutes, not seconds; never pass/fail on time).
bench: $(STAMP)
	./scripts/system-deps.sh --bench
	$(BIN)/python bench/xds_push_ack.py --envoys 1 20 --rounds 50
	$(BIN)/python bench/xds_fanout.py --streams 1000 5000 --pushes 3
	$(BIN)/python bench/raft_commit.py --sizes 1 3 5 --n 300 --kills 10
	$(BIN)/python bench/close_on_switch.py
	$(BIN)/python bench/tracing_overhead.py --proxies 1000 --rounds 20
	$(BIN)/python bench/failover_compare.py --write-results
	$(BIN)/python bench/patroni_compare.py --kills 5 --freezes 2 --write-results
	$(BIN)/python bench/snapshot_actions.py --redis-keys 200000 --pg-rows 200000 --seconds 8
	$(BIN)/python bench/snapshot_latency.py --rounds 8 --seconds 8 --rate 500 --keys 100000

# Patroni (etcd + 3 PostgreSQL) behind RepStage and behind HAProxy as Patroni documents it.
bench-patroni: $(STAMP)
	./scripts/system-deps.sh --bench
	$(BIN)/python bench/patroni_compare.py --kills 5 --freezes 2 --write-results

# Schemathesis over the whole OpenAPI document against a real node (about a minute).
fuzz-api: $(STAMP)
	$(BIN)/python scripts/fuzz_api.py --max-examples 100

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
