# capsa: top-level build. `make` builds everything (guest image included), `make test` runs unit and
# integration tests, `make e2e` the end-to-end suites (inside the nested test host when this machine has no
# hardware virtualisation), `make bench` prints the benchmarks.
SHELL := /bin/bash
ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo
RELEASE_BINS := capsa-vmm capsa-agent capsa capsa-testhost
E2E_LIST := $(ROOT)/build/e2e-tests.list

.PHONY: all binaries guest-image virtiofsd testhost-image test e2e bench lint clean-cache

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

# Build the end-to-end test binaries (release, so the timings mean something) and list them.
$(E2E_LIST): FORCE binaries
	@mkdir -p build
	$(CARGO) test --release -p capsa-e2e --no-run --message-format=json \
	  | python3 -c 'import json,sys; [print(m["executable"]) for m in map(json.loads, sys.stdin) if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]]' > $@
	@cat $@

e2e: all testhost-image $(E2E_LIST)
	CAPSA_TESTHOST_TESTS=1 $(CARGO) test --release -p capsa-testhost -- --test-threads=1
	bash tests/e2e/run-each.sh $(E2E_LIST)

# capsa run on the busybox image, printing from inside the microVM (in the nested test host when this
# machine has no hardware virtualisation).
.PHONY: demo
demo: binaries guest-image testhost-image
	bash tests/run-e2e.sh bash tests/e2e/scripts/demo.sh

bench: all testhost-image $(E2E_LIST)
	bash tests/run-e2e.sh target/release/capsa-bench
	bash tests/run-e2e.sh bash -c 'CAPSA_E2E=1 "$$(grep /containers- $(E2E_LIST))" --nocapture --test-threads=1 containers_in_a_guest 2>&1 | grep -E "^BENCH|test result"'
	bash tests/run-e2e.sh target/release/capsa-cri-bench

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

FORCE:
