# prom/prometheus stand-in, made by scripts/docker-bases.sh where no image
# registry is reachable: Debian's prometheus package (2.42) behind the official
# image's entrypoint (/bin is /usr/bin on bookworm), command, user, working directory and port.
FROM debian:bookworm-slim
# Debian packages unpinned (DL3008): bookworm point releases only bring fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown -R 65534:65534 /prometheus /etc/prometheus \
 && /bin/prometheus --version
# nobody:nogroup, as in the official image
USER 65534:65534
WORKDIR /prometheus
VOLUME ["/prometheus"]
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
