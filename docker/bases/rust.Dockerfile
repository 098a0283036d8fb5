# rust:1-slim-bookworm stand-in, made by scripts/docker-bases.sh where no image
# registry is reachable and rustup cannot download. The build context is the
# compiler part of the host's rustup toolchain (self-contained: built against
# glibc 2.17), staged by the script into ./toolchain. Paths follow the official
# image: cargo on PATH, CARGO_HOME=/usr/local/cargo. (No chmod after the COPY:
# it would duplicate the 600 MB layer; rustup's files are world-readable.)
FROM debian:bookworm-slim
ARG RUST_VERSION=unknown
# Same system packages as the official slim image.
# Debian packages unpinned (DL3008): bookworm point releases only bring fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY toolchain/ /usr/local/rust/
ENV CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    RUST_VERSION=${RUST_VERSION}
RUN mkdir -p /usr/local/cargo/bin \
 && rustc --version && cargo --version
LABEL org.opencontainers.image.description="Rust ${RUST_VERSION} (host toolchain) on Debian bookworm, built locally by scripts/docker-bases.sh"
CMD ["bash"]
