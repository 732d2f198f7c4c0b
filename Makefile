# The two commands of the README: `make run` (the main job) and `make test` (all tests).
# Every target bootstraps what it needs first (scripts/bootstrap.sh is idempotent).

SHELL := /bin/bash
CARGO ?= cargo
# The shared corpus when it sits beside the project (development machines, CI); otherwise
# empty, and the binaries download and check the official tarball themselves.
IMDB_DATA ?= $(wildcard $(abspath $(CURDIR)/../shared/data/aclImdb_labelled.tar.gz))
ifeq ($(strip $(IMDB_DATA)),)
unexport IMDB_DATA
else
export IMDB_DATA
endif
RUN_OUT ?= runs/demo
# One worker per GPU on a GPU machine (the job config's device is auto), else two CPU workers.
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
WORKERS ?= $(if $(filter-out 0,$(GPUS)),$(GPUS),2)
RUN_CONFIG ?= configs/cpu-demo.toml
BENCH_ARGS ?=

.PHONY: bootstrap build run data test fmt lint bench bench-quick chaos chaos-elastic reliability clean-runs image fuzz

bootstrap:
	@scripts/bootstrap.sh

build: bootstrap
	$(CARGO) build --release --bins

# Each `make run` trains afresh: a previous $(RUN_OUT) (which holds a finished job's
# checkpoint, so the coordinator would refuse it without --resume) moves to $(RUN_OUT).prev.
run: build
	@if [ -e $(RUN_OUT) ]; then echo "make run: moving the previous $(RUN_OUT) to $(RUN_OUT).prev"; \
	  rm -rf $(RUN_OUT).prev && mv $(RUN_OUT) $(RUN_OUT).prev; fi
	./target/release/coordinator --workers $(WORKERS) --config $(RUN_CONFIG) --out $(RUN_OUT) \
	  $(if $(IMDB_DATA),--data $(IMDB_DATA))

data: build
	./target/release/coordinator data $(if $(IMDB_DATA),--data $(IMDB_DATA))

# The integration tests start the coordinator and worker binaries, which `cargo test` builds
# only for a package's own integration tests, hence the build first. --all-targets (not
# --bins) resolves features with the dev-dependencies as `cargo test` does, so the test run
# reuses what the build compiled; with --bins, core, proto, worker and a dozen dependencies
# were compiled twice, once per feature set.
#
# The parsers of outside input (ring frames and hello, config TOML, corpus tar and folder,
# checkpoints, auth metadata) get a bounded property test each inside `cargo test`, and their
# cargo-fuzz targets (fuzz/README.md) run for FUZZ_SMOKE_SECONDS each: the five that do not
# link libtorch, whose instrumented build takes about 5 minutes on 2 cores (plus installing
# cargo-fuzz once). `checkpoint` is left to `make fuzz`: its instrumented libtorch build is
# too slow for every test run; its property test covers it here.
FUZZ_SMOKE_SECONDS ?= 10
test: bootstrap
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) build --workspace --all-targets
	scripts/tokenizers_env.sh
	$(CARGO) test --workspace
	FUZZ_SECONDS=$(FUZZ_SMOKE_SECONDS) scripts/fuzz.sh ring_wire config_toml corpus_tar corpus_folder auth_metadata
	deploy/tests/run.sh

# Every fuzz target for FUZZ_SECONDS each (default 60; FUZZ_TARGETS="ring_wire ..." for some),
# with cargo-fuzz 0.13.2 installed first when missing (cargo install --locked). On stable Rust
# through RUSTC_BOOTSTRAP=1; see fuzz/README.md and scripts/fuzz.sh.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?=
fuzz: bootstrap
	FUZZ_SECONDS=$(FUZZ_SECONDS) scripts/fuzz.sh $(FUZZ_TARGETS)

# An OCI image (target/image/oci) without a registry: debootstrap + umoci (scripts/image.sh);
# deploy/Dockerfile builds the same with docker/buildah where base images can be pulled.
image: build
	scripts/image.sh target/release

fmt:
	$(CARGO) fmt --all

lint: bootstrap
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Ours against the PyTorch reference (bench/reference), one table in bench/RESULTS.md.
bench: build
	scripts/bench_env.sh
	$(CARGO) build --release -p trainer-bench -p worker --bins
	python3 bench/run_bench.py $(if $(IMDB_DATA),--data $(IMDB_DATA)) $(BENCH_ARGS)

bench-quick:
	$(MAKE) bench BENCH_ARGS="--reps 1 --steps 50 --sections pipeline,train1,train2,allreduce"

# Random workers killed at random times; every job must end bitwise equal to an
# uninterrupted one (bench/chaos.py). CHAOS_ARGS="--trials 5" for a shorter run.
CHAOS_ARGS ?=
chaos: build
	bench/chaos.sh $(if $(IMDB_DATA),--data $(IMDB_DATA)) $(CHAOS_ARGS)

# Every fault kind of bench/chaos.py (process, network, disk, damaged checkpoints), 3 trials
# each (about 10 minutes on 2 cores; root for the network kinds and the full disk), into
# bench/RELIABILITY.md.
reliability: build
	bench/chaos.sh $(if $(IMDB_DATA),--data $(IMDB_DATA)) --kind all --trials 3 --reliability bench/RELIABILITY.md $(CHAOS_ARGS)

# Elastic jobs (--workers 2:4) under random kills and joins of external workers (issue 22):
# how many completed, how many hung, the largest test accuracy gap to a fixed-size run.
chaos-elastic: build
	bench/chaos.sh --elastic $(if $(IMDB_DATA),--data $(IMDB_DATA)) --results bench/RESULTS.md $(CHAOS_ARGS)

clean-runs:
	rm -rf runs
