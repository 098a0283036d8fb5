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
# tch builds against the libtorch inside the venv's torch wheel.
CARGO := LIBTORCH_USE_PYTORCH=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" cargo

.PHONY: run setup venv build-tools model test-data build sbom test test-rust test-k8s test-containers test-reliability test-protocol lint bench bench-cuda clean

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

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

model: $(MODEL_DIR)/model.pt $(PRETRAINED_DIR)/model.pt $(AOTI_DIR)/model.pt2
$(MODEL_DIR)/model.pt: models/export.py | $(VENV)/.installed
	$(PY) models/export.py --arch $(MODEL) --out $(MODEL_DIR) --force
$(PRETRAINED_DIR)/model.pt: models/export.py | $(VENV)/.installed
	$(PY) models/export.py --arch efficientnet_lite0 --out $(PRETRAINED_DIR) --force
# About 40 s on 2 cores (the C++ compile); the package runs on this torch version's CPU build.
$(AOTI_DIR)/model.pt2: models/export.py | $(VENV)/.installed
	$(PY) models/export.py --arch efficientnet_lite0 --format aoti --out $(AOTI_DIR) --force

# About 75 s on 2 cores (calibration, then the C++ compile).
$(AOTI_INT8_DIR)/model.pt2: models/export.py | $(VENV)/.installed
	$(PY) models/export.py --arch efficientnet_lite0 --format aoti --quantize int8 --out $(AOTI_INT8_DIR) --force

test-data: $(TEST_DATA)/reference.json
$(TEST_DATA)/reference.json: tests/python/reference.py tests/data/accuracy.json models/photos.py \
		$(MODEL_DIR)/model.pt $(PRETRAINED_DIR)/model.pt $(AOTI_DIR)/model.pt2 $(AOTI_INT8_DIR)/model.pt2
	$(PY) tests/python/reference.py --model-dir $(MODEL_DIR) --repository models --out $(TEST_DATA)

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
# Pinned; built once into target/tools (about a minute on 2 cores).
$(CARGO_SBOM):
	cargo install --locked --quiet --root target/tools cargo-sbom@0.10.0

## The whole suite: formatting, unit and integration tests (real model, real sockets),
## Kubernetes manifests against real schemas, the container tests (real Docker engine, real
## Prometheus), then the reliability tests (load balancer, overload, slow clients, containers),
## then the Open Inference Protocol with tritonclient and KServe's SDK.
test: test-rust test-k8s test-containers test-reliability test-protocol

# In the release profile: the binary the tests run (and the crates they compile) are the ones
# `make build` ships, so the build after the tests compiles nothing again.
test-rust: setup
	cargo fmt --check
	$(PY) scripts/check-features.py
	TCH_SERVE_TEST_MODEL_DIR=$(CURDIR)/$(MODEL_DIR) TCH_SERVE_TEST_DATA=$(CURDIR)/$(TEST_DATA) \
		$(CARGO) test --release --locked -- --nocapture 2>&1 | tee target/test-rust.log; \
		exit $${PIPESTATUS[0]}
	@grep -h -E '^(PARITY|STARTUP|ACCURACY|SKIP):' target/test-rust.log || true

test-containers: build setup
	scripts/container-test.sh

test-k8s:
	scripts/k8s-validate.sh

test-reliability: build setup
	scripts/reliability-test.sh

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

lint: venv build-tools
	cargo fmt --check
	$(PY) scripts/check-features.py
	$(CARGO) clippy --release --locked --all-targets -- -D warnings

clean:
	rm -rf target $(VENV) $(MODEL_DIR) $(PRETRAINED_DIR) $(AOTI_DIR) $(AOTI_INT8_DIR)
