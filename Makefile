# capsa: top-level build. `make` builds everything (guest image included), `make test` runs unit and
# integration tests, `make e2e` the end-to-end suites (inside the nested test host when this machine has no
# hardware virtualisation), `make bench` prints the benchmarks.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo
RELEASE_BINS := capsa-vmm capsa-agent capsa capsa-testhost
E2E_LIST := $(ROOT)/build/e2e-tests.list

.PHONY: all binaries guest-image virtiofsd testhost-image test e2e bench lint clean-cache fuzz

all: binaries guest-image virtiofsd

binaries:
	$(CARGO) build --release --workspace --bins

guest-image: binaries
	bash guest-image/build-kernel.sh
	bash guest-image/build-initrd.sh target/release/capsa-agent build/guest/initrd.img

# virtiofsd 1.14 (crates.io) for virtio-fs, cached under $CAPSA_CACHE, copied to build/virtiofsd.
virtiofsd:
	bash guest-image/build-virtiofsd.sh

testhost-image: binaries
	target/release/capsa-testhost build-image

# Release, like everything else here, so the dependencies are compiled once (see Cargo.toml's profile).
test:
	$(CARGO) test --release --workspace
	# The VMM's seccomp self-test hook exists only in debug builds (never in a release binary).
	$(CARGO) test -p capsa-vmm --test seccomp

# The cargo-fuzz targets (fuzz/, nightly), FUZZ_SECONDS (default 45) each from the committed corpus; a crash
# fails with the reproducer's path under fuzz/artifacts/.
fuzz:
	bash fuzz/run-all.sh

TESTHOST_LIST := $(ROOT)/build/testhost-tests.list

# Build every test binary (release and --workspace, exactly as `make test` does, so nothing is compiled
# again) and list the end-to-end suites and the test-host runner's tests.
$(E2E_LIST): FORCE binaries
	@mkdir -p build
	$(CARGO) test --release --workspace --no-run --message-format=json > build/test-artifacts.json
	python3 tests/list-test-binaries.py build/test-artifacts.json tests/e2e > $@
	python3 tests/list-test-binaries.py build/test-artifacts.json tests/testhost > $(TESTHOST_LIST)
	@cat $@ $(TESTHOST_LIST)

e2e: all testhost-image $(E2E_LIST)
	set -e; for t in $$(cat $(TESTHOST_LIST)); do (cd tests/testhost && CAPSA_TESTHOST_TESTS=1 $$t --test-threads=1); done
	bash tests/e2e/run-each.sh $(E2E_LIST)

# capsa run on the busybox image, printing from inside the microVM (in the nested test host when this
# machine has no hardware virtualisation).
.PHONY: demo
demo: binaries guest-image testhost-image
	bash tests/run-e2e.sh bash tests/e2e/scripts/demo.sh

# Every benchmark in a test host of its own; each figure prints how many of its runs succeeded, and a missing
# figure or one from fewer than 80 % of its runs fails (tests/e2e/bench.sh; output in build/bench.log). A
# benchmark whose test host died or kept failing runs again in a fresh one (CAPSA_E2E_HOST_RETRIES).
bench: all testhost-image $(E2E_LIST)
	bash tests/e2e/bench.sh $(E2E_LIST)

lint:
	$(CARGO) fmt --all --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

FORCE:
