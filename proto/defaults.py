"""Every option's default, its one-line help and its ``SHARDPS_*`` variable, written once.

The CLI (``client/cli.py``), the roles' config dataclasses (``coordinator/main.py``,
``server/main.py``, ``worker/train.py``, ``client/run.py``, ``client/launch.py``) and
``LocalCluster`` read their defaults from here, and the environment table of
``docs/configuration.md`` is generated from it (``scripts/gen_docs.py``; a test checks the
committed table is current and that every ``SHARDPS_*`` name the package reads is listed).

It lives in ``proto/``, the lowest room, and imports nothing from the package (nor torch),
so every role and the CLI's ``--help`` can read it cheaply.

    from shardps.proto.defaults import LEASE_S, setting
    setting("lease_seconds").env   # "SHARDPS_LEASE_SECONDS"
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The values runtime code uses as plain constants (a dataclass field, a keyword default).
LEASE_S = 10.0  # a worker silent this long leaves the job's membership
REPLICA_LEASE_S = 1.5  # a primary answers this long after the coordinator's last placement call
STEP_TIMEOUT_S = 300.0  # sync: how long a push waits on the server for its step to close
# A worker's deadline for one push-pull attempt: longer than the server's own wait, so the
# server's message (which workers are missing) arrives before the client gives up.
PUSH_TIMEOUT_S = STEP_TIMEOUT_S + 30.0
CONNECT_TIMEOUT_S = 120.0  # a worker waits this long for the cluster and min_workers
RUN_CHECKPOINT_EVERY = 100  # `shardps run` and LocalCluster: servers checkpoint every N versions
CHECKPOINT_KEEP = 3  # newest checkpoints kept per shard
FIRST_MESSAGE_S = 5.0  # a request stream that sends nothing this long is cancelled (every shardps client sends at once)
COORDINATOR_PORT, SERVER_PORT = 7070, 7071
COORDINATOR_THREADS, SERVER_THREADS, WORKER_THREADS = 32, 64, 1
EVAL_EVERY = 50  # rank 0 evaluates on held-out data every N steps
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9  # DiLoCo's outer Nesterov SGD (Douillard et al. 2023)
LINK_PARTS = 8  # a sync push on a byte link comes in up to this many parts (server/parts.py)

# The optimizers a shard can run: every elementwise torch.optim class, by its lower-case name
# (proto/optim.py maps them to the classes; a test keeps the two lists equal).
OPTIMIZER_NAMES = ("adadelta", "adagrad", "adam", "adamax", "adamw", "asgd", "nadam", "radam", "rmsprop",
                   "rprop", "sgd")


@dataclass(frozen=True)
class Setting:
    key: str  # the option's name; "role.name" where roles share a variable with different defaults
    env: str  # the SHARDPS_* variable that sets it
    default: Any  # None: required (no default)
    help: str  # one line, shown by --help and in docs/configuration.md
    read_by: str  # the commands (or APIs) that read it
    shown: str = ""  # the default as the docs show it, where the value alone would mislead

    @property
    def name(self) -> str:
        """The option's parameter name (``server.port`` -> ``port``)."""
        return self.key.rpartition(".")[2]

    def shown_default(self) -> str:
        if self.shown:
            return self.shown
        if self.default is None:
            return "required"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default) if self.default != "" else "–"


_ROLE = "coordinator, server"
_TRAIN = "run, worker"
SETTINGS: tuple[Setting, ...] = (
    # The roles.
    Setting("host", "SHARDPS_HOST", "127.0.0.1", "Interface to bind; 0.0.0.0 in containers.", _ROLE),
    Setting("coordinator.port", "SHARDPS_PORT", COORDINATOR_PORT, "Port to serve on; 0 picks a free one.",
            "coordinator"),
    Setting("server.port", "SHARDPS_PORT", SERVER_PORT, "Port to serve on; 0 picks a free one.", "server"),
    Setting("data_port", "SHARDPS_DATA_PORT", 0,
            "Byte-link port beside gRPC: workers on other hosts send gradients and take parameters on it as raw "
            "TCP (0: any free port, told to workers over gRPC; -1: none, every byte over gRPC). Not offered under "
            "TLS.", "server"),
    Setting("link_parts", "SHARDPS_LINK_PARTS", LINK_PARTS,
            "Sync pushes on a byte link come in up to this many parts (of at least 512 KiB, cut between "
            "parameters): each part is applied once every worker's is in and sent back while later parts still "
            "arrive, so both directions of a link are busy at once (1: whole pushes; a worker with 1 pushes "
            "whole whatever its servers offer).", "server, worker"),
    Setting("port_file", "SHARDPS_PORT_FILE", "", "Write the bound port to this file.", _ROLE),
    Setting("num_servers", "SHARDPS_NUM_SERVERS", 2, "Shard servers the parameters are cut across.", "coordinator"),
    Setting("coordinator.threads", "SHARDPS_THREADS", COORDINATOR_THREADS,
            "gRPC handler threads (membership watches hold one each).", "coordinator"),
    Setting("server.threads", "SHARDPS_THREADS", SERVER_THREADS,
            "gRPC handler threads (>= workers + 8: a sync step parks one per waiting worker).", "server"),
    Setting("worker.threads", "SHARDPS_THREADS", WORKER_THREADS, "torch intra-op threads.", "worker"),
    Setting("log_level", "SHARDPS_LOG_LEVEL", "info", "Log level: debug, info, warning or error.", _ROLE),
    Setting("metrics_port", "SHARDPS_METRICS_PORT", -1,
            "Serve Prometheus metrics on this port (0: any free one; -1: off).", "coordinator, server, worker"),
    Setting("lease_seconds", "SHARDPS_LEASE_SECONDS", LEASE_S,
            "A worker silent this long is removed from the job's membership.", "coordinator"),
    Setting("replica_lease_seconds", "SHARDPS_REPLICA_LEASE_SECONDS", REPLICA_LEASE_S,
            "Replicated jobs: a shard's primary answers this long after the coordinator last renewed it; a "
            "server silent this long (x 1.01) is declared dead and its shards fail over (one whose port refuses connections, at once).", "coordinator"),
    Setting("resume_job", "SHARDPS_RESUME_JOB", "", "job.json from a prepared checkpoint: run that job from its step.",
            "coordinator"),
    Setting("state_dir", "SHARDPS_STATE_DIR", "",
            "Keep the coordinator's state (jobs, plans, views) here: a restart resumes its jobs; one coordinator "
            "per directory.", "coordinator", shown="– (in memory)"),
    Setting("coordinator", "SHARDPS_COORDINATOR", None, "Coordinator address, host:port.", "server"),
    Setting("advertise", "SHARDPS_ADVERTISE", "", "host:port workers dial (default host:port).", "server"),
    Setting("shard_id", "SHARDPS_SHARD_ID", -1, "Shard id; -1 lets the coordinator assign one.", "server"),
    Setting("compute_threads", "SHARDPS_COMPUTE_THREADS", 0,
            "torch threads for the optimizer (0: every core; servers sharing a host should split its cores, as "
            "LocalCluster does).", "server"),
    Setting("step_timeout", "SHARDPS_STEP_TIMEOUT", STEP_TIMEOUT_S, "Sync: seconds a push waits for its step.",
            "server"),
    Setting("checkpoint_dir", "SHARDPS_CHECKPOINT_DIR", "",
            "Checkpoint the shard to DIR/shard-<id>/ (and restore from it on restart).", "server"),
    Setting("server.checkpoint_every", "SHARDPS_CHECKPOINT_EVERY", 0,
            "Also checkpoint every N versions (needs --checkpoint-dir).", "server"),
    Setting("run.checkpoint_every", "SHARDPS_CHECKPOINT_EVERY", RUN_CHECKPOINT_EVERY,
            "Servers checkpoint every N steps (with --scenario: 10 by default; 0: only at the start and the end).",
            "run"),
    Setting("first_message_timeout", "SHARDPS_FIRST_MESSAGE_TIMEOUT", FIRST_MESSAGE_S,
            "Cancel a request stream that sends nothing for this many seconds.", "server"),
    Setting("streams_per_host", "SHARDPS_STREAMS_PER_HOST", 0,
            "Request streams one host may hold open (0: threads - 8, the whole long-call capacity).", "server"),
    Setting("checkpoint_keep", "SHARDPS_CHECKPOINT_KEEP", CHECKPOINT_KEEP, "Newest checkpoints kept per shard.",
            "server"),
    Setting("history_dir", "SHARDPS_HISTORY_DIR", "",
            "Append what this process does to the run's history in DIR, for shardps check ('' records none; "
            "LocalCluster and shardps run set it).", "server, ShardedOptimizer"),
    # Training (run and worker share these).
    Setting("cluster", "SHARDPS_CLUSTER", None, "Coordinator address, host:port.",
            "worker, status, export, checkpoint, chaos, ShardedOptimizer"),
    Setting("workload", "SHARDPS_WORKLOAD", "digits", "Built-in workload: digits or charlm.", _TRAIN),
    Setting("mode", "SHARDPS_MODE", "sync",
            "sync, ssp or async; diloco or diloco-async: local SGD (DiLoCo), --optimizer takes --sync-every steps on "
            "each worker, then the shards take one Nesterov SGD outer step (sync or async).", _TRAIN),
    Setting("sync_every", "SHARDPS_SYNC_EVERY", 0, "diloco modes: inner steps between two outer steps (H).", _TRAIN),
    Setting("fragments", "SHARDPS_FRAGMENTS", 1,
            "diloco modes: streaming DiLoCo, the model cut into F fragments (jobs <job>.f0 ...), one synced every "
            "H/F inner steps (1: the whole model every H).", _TRAIN),
    Setting("outer_lr", "SHARDPS_OUTER_LR", OUTER_LR, "diloco modes: the outer Nesterov SGD's lr.", _TRAIN),
    Setting("outer_momentum", "SHARDPS_OUTER_MOMENTUM", OUTER_MOMENTUM,
            "diloco modes: the outer SGD's momentum (0: plain SGD, no Nesterov).", _TRAIN),
    Setting("optimizer", "SHARDPS_OPTIMIZER", "",
            f"Any elementwise torch.optim, by name: {', '.join(OPTIMIZER_NAMES)} (default: the workload's).",
            _TRAIN, shown="workload's"),
    Setting("lr", "SHARDPS_LR", 0.0, "Learning rate (0: the workload's default).", _TRAIN, shown="workload's"),
    Setting("batch_size", "SHARDPS_BATCH_SIZE", 0, "Samples per worker per step (0: the workload's default).",
            _TRAIN, shown="workload's"),
    Setting("steps", "SHARDPS_STEPS", 0, "Steps to train (0: from --epochs).", _TRAIN, shown="from epochs"),
    Setting("epochs", "SHARDPS_EPOCHS", 0.0, "Passes over the data (0: the workload's default).", _TRAIN,
            shown="workload's"),
    Setting("device", "SHARDPS_DEVICE", "cpu", "Worker device: cpu, cuda, cuda:N, mps or auto.", _TRAIN),
    Setting("seed", "SHARDPS_SEED", 0, "Model init and data order.", _TRAIN),
    Setting("min_workers", "SHARDPS_MIN_WORKERS", 1, "Training starts with this many workers.",
            "worker, ShardedOptimizer (launch sets it)"),
    Setting("wire_dtype", "SHARDPS_WIRE_DTYPE", "float32",
            "Gradient dtype on the wire: float32, bfloat16, float16 or int8 (error feedback).",
            _TRAIN),
    Setting("pull_dtype", "SHARDPS_PULL_DTYPE", "float32",
            "Parameter dtype of each step's reply over the network: float32, or bfloat16 / float16 (half the bytes; "
            "workers hold the shards' fp32 values rounded, the shards keep them exact).", _TRAIN),
    Setting("transport", "SHARDPS_TRANSPORT", "auto",
            "auto: gradients and parameters through shared memory with shards on the same host, on each server's "
            "byte link (raw TCP beside gRPC) with the others, inside gRPC where neither works; tcp: the byte link "
            "even on one host; grpc: always inside gRPC.", _TRAIN + ", ShardedOptimizer"),
    Setting("backup_workers", "SHARDPS_BACKUP_WORKERS", 0,
            "Sync/ssp: close each step after the first (workers - B) pushes.", _TRAIN),
    Setting("staleness", "SHARDPS_STALENESS", 0, "ssp: steps a worker may run ahead of the last closed step.", _TRAIN),
    Setting("staleness_lr", "SHARDPS_STALENESS_LR", False, "Async/ssp: apply lr / max(1, staleness).", _TRAIN),
    Setting("topk_ratio", "SHARDPS_TOPK_RATIO", 0.0,
            "Send only this fraction of each shard's gradient (top-k, error feedback).", _TRAIN, shown="0 (all)"),
    Setting("balance_every", "SHARDPS_BALANCE_EVERY", 0,
            "Sync/ssp: every N steps re-split each global batch by worker throughput (0: equal).", _TRAIN),
    Setting("replicas", "SHARDPS_REPLICAS", 1,
            "Copies of each shard on different servers (2+: a killed server fails over to a copy, nothing rolls "
            "back; 1: it costs a rollback to the last checkpoint).", _TRAIN),
    Setting("amp", "SHARDPS_AMP", "", "Mixed precision on workers: bfloat16 or float16 (loss scaling).", _TRAIN,
            shown="off"),
    Setting("eval_every", "SHARDPS_EVAL_EVERY", EVAL_EVERY, "Held-out evaluation (rank 0) every N steps.", _TRAIN),
    Setting("slowdown", "SHARDPS_SLOWDOWN", 1.0,
            "Simulate a slower machine: stretch each step's compute by this factor.", "worker"),
    Setting("metrics", "SHARDPS_METRICS", "", "Append one JSON line per step to this file.", "worker"),
    Setting("tensorboard", "SHARDPS_TENSORBOARD", "",
            "Also write TensorBoard events into this directory (needs shardps[tb]; `shardps run`: tensorboard/ in "
            "the run directory).", "worker"),
    Setting("name", "SHARDPS_WORKER_NAME", "", "Name in status (default host:pid).", "worker, ShardedOptimizer",
            shown="host:pid"),
    Setting("connect_timeout", "SHARDPS_CONNECT_TIMEOUT", CONNECT_TIMEOUT_S,
            "Seconds to wait for the cluster and min_workers.", "worker"),
    # `shardps run`.
    Setting("servers", "SHARDPS_SERVERS", 2, "Shard servers to start.", "run"),
    Setting("workers", "SHARDPS_WORKERS", 2, "Worker processes to start.", "run"),
    Setting("scenario", "SHARDPS_SCENARIO", "", "TOML file of faults to inject; writes report.md into the run "
            "directory.", "run"),
    Setting("durable", "SHARDPS_DURABLE", True, "Keep coordinator state and shard checkpoints on disk, so a killed "
            "process is survived (--no-durable: in memory only).", "run"),
    Setting("out", "SHARDPS_OUT", "", "Run directory (default runs/<workload>-<time>).", "run",
            shown="runs/<workload>-<time>"),
    # Who may talk to the cluster (runtime/security.py reads these; every role and client).
    Setting("auth_token", "SHARDPS_AUTH_TOKEN", "",
            "The workers' shared token: worker calls must carry it (UNAUTHENTICATED otherwise).",
            "every role and client", shown="off"),
    Setting("auth_token_file", "SHARDPS_AUTH_TOKEN_FILE", "",
            "Read SHARDPS_AUTH_TOKEN from this file (a Docker/Swarm secret) when it is unset.",
            "every role and client"),
    Setting("cluster_token", "SHARDPS_CLUSTER_TOKEN", "",
            "The cluster's own credential: internal and admin calls must carry it (PERMISSION_DENIED otherwise; "
            "it is valid for worker calls too); never give it to workers.",
            "coordinator, servers, operators (chaos, checkpoint)",
            shown="off (a role without it logs that internal calls are open; LocalCluster/run make one up)"),
    Setting("cluster_token_file", "SHARDPS_CLUSTER_TOKEN_FILE", "",
            "Read SHARDPS_CLUSTER_TOKEN from this file (a secret) when it is unset.",
            "coordinator, servers, operators"),
    Setting("tls_cert", "SHARDPS_TLS_CERT", "",
            "This process's certificate (PEM): a server's, or a client's for mutual TLS; with SHARDPS_TLS_KEY.",
            "every role (clients: for mutual TLS)", shown="off"),
    Setting("tls_key", "SHARDPS_TLS_KEY", "", "This process's private key (PEM).",
            "every role (clients: for mutual TLS)", shown="off"),
    Setting("tls_ca", "SHARDPS_TLS_CA", "",
            "CA that signed the peer's certificate (clients: the servers'; servers with mutual TLS: the clients'); "
            "clients use TLS when it is set.",
            "every role and client", shown="off"),
    Setting("tls_client_auth", "SHARDPS_TLS_CLIENT_AUTH", "",
            "1: servers require a client certificate signed by the CA (mutual TLS).",
            _ROLE, shown="off"),
    # What `shardps launch` sets for the scripts it starts (read by the scripts, not by shardps).
    Setting("script.local_rank", "SHARDPS_LOCAL_RANK", "", "Set by launch: the process's index on this machine (also "
            "LOCAL_RANK): pick cuda:LOCAL_RANK.", "launch sets it, scripts read it"),
    Setting("script.nproc", "SHARDPS_NPROC", "", "Set by launch: worker processes on this machine.",
            "launch sets it, scripts read it"),
    Setting("script.restart_count", "SHARDPS_RESTART_COUNT", "", "Set by launch: how often this worker was restarted.",
            "launch sets it, scripts read it"),
)

# Variables the deployment files and setup scripts read (not the Python package).
DEPLOY_SETTINGS: tuple[Setting, ...] = (
    Setting("image", "SHARDPS_IMAGE", "shardps:latest", "The image every role of the compose stack runs.",
            "docker-compose.yml"),
    Setting("gpu_image", "SHARDPS_GPU_IMAGE", "shardps:cuda", "A CUDA build of the image for the gpu and hetero "
            "profiles.", "docker-compose.yml"),
    Setting("gpu_amp", "SHARDPS_GPU_AMP", "bfloat16", "Mixed precision of the compose GPU worker.",
            "docker-compose.yml"),
    Setting("prometheus_image", "SHARDPS_PROMETHEUS_IMAGE", "shardps-prometheus:latest", "The Prometheus image of the "
            "metrics profile (built by deploy/prometheus.Dockerfile).", "docker-compose.yml"),
    Setting("base", "SHARDPS_BASE", "debian:bookworm-slim", "Base image of deploy/prometheus.Dockerfile.",
            "docker-compose.yml"),
    Setting("certs_dir", "SHARDPS_CERTS_DIR", "./deploy/no-certs",
            "Folder of scripts/dev-certs.sh certificates, mounted at /certs for TLS.",
            "docker-compose.yml"),
    Setting("shm_size", "SHARDPS_SHM_SIZE", "2g", "Size of the /dev/shm the compose stack's servers and workers "
            "share (the shared-memory byte path between its containers).", "docker-compose.yml"),
    Setting("torch", "SHARDPS_TORCH", "", "keep: scripts/setup.sh leaves the torch already in .venv (a CUDA build).",
            "scripts/setup.sh", shown="install the pinned CPU build"),
    Setting("torch_version", "SHARDPS_TORCH_VERSION", "2.13.0", "The torch version scripts/setup.sh pins.",
            "scripts/setup.sh"),
)

_BY_KEY = {s.key: s for s in SETTINGS}


def setting(key: str) -> Setting:
    """The setting named ``key`` (``"lease_seconds"``, ``"server.port"``); KeyError names the known ones."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise KeyError(f"no setting {key!r}; known: {', '.join(_BY_KEY)}") from None


def env_names() -> set[str]:
    """Every SHARDPS_* variable listed here (package and deployment)."""
    return {s.env for s in SETTINGS + DEPLOY_SETTINGS}
