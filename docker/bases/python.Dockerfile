# python:3.11-slim-bookworm stand-in, made by scripts/docker-bases.sh where no
# image registry is reachable: Debian bookworm's python3 is 3.11, which fits the
# cp311 wheels the project installs (torch, torchvision). Like the official
# image, `python3 -m venv` and pip work; python lives in /usr/bin, not /usr/local/bin.
FROM debian:bookworm-slim
ENV LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1
# Debian packages unpinned (DL3008): bookworm point releases only bring fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-pip \
 && ln -sf /usr/bin/python3 /usr/local/bin/python \
 && rm -rf /var/lib/apt/lists/* \
 && python3 --version
CMD ["python3"]
