# shardps image: every role (coordinator, shard server, worker) and the CLI.
#
#   docker build -t shardps .                                   # online, from python:3.11-slim
#   docker build -t shardps --build-arg BASE=shardps-base:bookworm \
#       --build-arg PIP_ARGS="--no-index --find-links /wheelhouse" .   # offline, as CI does
#
# Offline builds take their wheels from deploy/wheelhouse/ (scripts/docker-wheelhouse.sh
# fills it). torch is the CPU wheel; a GPU image installs its CUDA torch instead (README).
ARG BASE=python:3.11-slim
FROM ${BASE}

ARG PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
ARG TORCH_VERSION=2.13.0

# The malloc settings the performance work measured (bench/RESULTS.md), unbuffered logs.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1 \
    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824:glibc.malloc.arena_max=1 \
    SHARDPS_HOST=0.0.0.0 \
    SHARDPS_DATA_PORT=7072

COPY deploy/wheelhouse/ /wheelhouse/
COPY pyproject.toml README.md /src/shardps/
COPY __init__.py __main__.py /src/shardps/
COPY proto/ /src/shardps/proto/
COPY runtime/ /src/shardps/runtime/
COPY server/ /src/shardps/server/
COPY coordinator/ /src/shardps/coordinator/
COPY worker/ /src/shardps/worker/
COPY client/ /src/shardps/client/
COPY chaos/ /src/shardps/chaos/
# A core install (scikit-learn, the built-in workloads' data, included); no plots or TensorBoard.
RUN python3 -m pip install ${PIP_ARGS} "torch==${TORCH_VERSION}" \
 && python3 -m pip install ${PIP_ARGS} /src/shardps \
 && rm -rf /wheelhouse /src \
 && useradd --create-home --uid 10001 shardps \
 && mkdir -p /checkpoints /run-data /state && chown shardps /checkpoints /run-data /state

USER shardps
WORKDIR /run-data
# Each role handles SIGTERM itself (servers checkpoint, then stop); compose adds an init (init: true)
# so PID 1 also reaps children and forwards signals.
EXPOSE 7070 7071 7072 9100
HEALTHCHECK --interval=5s --timeout=4s --start-period=30s --retries=5 \
  CMD shardps probe "127.0.0.1:${SHARDPS_PORT:-7070}" --timeout 3
ENTRYPOINT ["shardps"]
CMD ["--help"]
