# Prometheus from Debian's package, for docker-compose's `metrics` profile and the Swarm stack: no
# registry image to pull, so it builds wherever the shardps image builds (CI builds both on the
# debootstrap-made base: BASE=shardps-base:bookworm).
#
#   docker build -t shardps-prometheus -f deploy/prometheus.Dockerfile deploy
ARG BASE=debian:bookworm-slim
FROM ${BASE}

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus && chown prometheus /prometheus

USER prometheus
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \
     "--web.listen-address=0.0.0.0:9090"]
