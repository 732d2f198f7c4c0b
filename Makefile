# The two commands of the README: `make run` (the main job) and `make test` (all tests).
# Every target bootstraps what it needs first (scripts/bootstrap.sh is idempotent).

SHELL := /bin/bash
CARGO ?= cargo
# The shared corpus when it sits beside the project (development machines, CI); otherwise
# empty, and the binaries download and check the official tarball themselves.
IMDB_DATA ?= $(wildcard $(abspath $(CURDIR)/../shared/data/aclImdb_labelled.tar.gz))
export IMDB_DATA
RUN_OUT ?= runs/demo

.PHONY: bootstrap build run test fmt lint bench clean-runs

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --bins

run: build
	./target/release/coordinator data $(if $(IMDB_DATA),--data $(IMDB_DATA))

test: bootstrap
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace

fmt:
	$(CARGO) fmt --all

lint: bootstrap
	$(CARGO) clippy --workspace --all-targets -- -D warnings

bench: build
	$(CARGO) build --release -p trainer-bench
	./target/release/pipeline_bench $(if $(IMDB_DATA),--data $(IMDB_DATA))

clean-runs:
	rm -rf runs
