"""The ``shardps`` command: thin typer commands over the SDK and the role entry points.

    shardps run                                   # the demo: local cluster, 2 workers, digits
    shardps coordinator --port 7070 --num-servers 2
    shardps server --coordinator 127.0.0.1:7070 --port 7071
    shardps worker --cluster 127.0.0.1:7070 --workload digits
    shardps status --cluster 127.0.0.1:7070 [--json]
    shardps launch --nproc 4 train.py ARGS                # your script as 4 workers (torchrun-style)
    shardps export --cluster 127.0.0.1:7070 --out model.safetensors

Every option can also be set by its ``SHARDPS_*`` environment variable (shown in --help).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

import typer

from ..proto import defaults

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="shardps: a parameter server for PyTorch.")
CLUSTER_HELP = defaults.setting("cluster").help


def _opt(key: str, *flags: str, env: bool = True, **overrides):
    """A typer option whose default, help and environment variable come from ``proto/defaults.py``
    (one source, also for docs/configuration.md). ``env=False``: no variable (launch's options)."""
    s = defaults.setting(key)
    default = overrides.pop("default", ... if s.default is None else s.default)
    return typer.Option(default, *flags, envvar=s.env if env else None, help=overrides.pop("help", s.help),
                        **overrides)


# Training options shared by `run` and `worker`, defined once.
_TRAIN = {key: _opt(key) for key in (
    "workload", "mode", "optimizer", "lr", "batch_size", "steps", "epochs", "device", "seed", "wire_dtype",
    "pull_dtype", "transport", "backup_workers", "staleness", "topk_ratio", "balance_every", "replicas", "amp", "eval_every",
    "sync_every", "fragments", "outer_lr", "outer_momentum")}
_TRAIN["staleness_lr"] = _opt("staleness_lr", "--staleness-lr")

# Every role (coordinator, server, worker) serves Prometheus metrics the same way.
_METRICS_PORT = _opt("metrics_port")
_LOG_LEVEL = _opt("log_level")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(message: str, code: int = 2) -> None:
    """One line on stderr that names the fix, and a non-zero exit; never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def _user_errors(cluster: str = ""):
    """Turn the errors a user can cause into one-line messages."""
    from ..client.local import ClusterError
    from ..client.run import RunError
    from ..proto.errors import ShardpsError

    try:
        yield
    except ShardpsError as exc:
        if getattr(exc, "code", "") == "UNAVAILABLE" and cluster:
            _fail(f"cannot reach the coordinator at {cluster}; is the cluster running? Pass --cluster HOST:PORT", 1)
        _fail(str(exc).splitlines()[0], 1)
    except (ValueError, RunError, ClusterError) as exc:
        _fail(str(exc).splitlines()[0], 1 if not isinstance(exc, ValueError) else 2)
    except ImportError as exc:  # an optional piece (or the workload's data) is missing: say what to install
        _fail(str(exc).splitlines()[0], 1)
    except KeyboardInterrupt:
        _fail("interrupted; every process this command started was stopped", 130)


@app.command()
def coordinator(
    host: str = _opt("host"),
    port: int = _opt("coordinator.port"),
    num_servers: int = _opt("num_servers"),
    threads: int = _opt("coordinator.threads"),
    port_file: str = _opt("port_file"),
    lease_seconds: float = _opt("lease_seconds"),
    replica_lease_seconds: float = _opt("replica_lease_seconds"),
    resume_job: str = _opt("resume_job"),
    state_dir: str = _opt("state_dir"),
    metrics_port: int = _METRICS_PORT,
    log_level: str = _LOG_LEVEL,
):
    """Run the coordinator (job spec, shard plan, membership)."""
    from ..coordinator.journal import JournalError
    from ..coordinator.main import CoordinatorConfig, serve

    _setup_logging(log_level)
    try:
        config = CoordinatorConfig(host=host, port=port, num_servers=num_servers, threads=threads,
                                   port_file=port_file, lease_seconds=lease_seconds, resume_job=resume_job,
                                   replica_lease_seconds=replica_lease_seconds,
                                   state_dir=state_dir, metrics_port=metrics_port)
        serve(config)
    except (ValueError, JournalError) as exc:
        _fail(str(exc))


@app.command()
def server(
    coordinator: str = _opt("coordinator"),
    host: str = _opt("host"),
    port: int = _opt("server.port"),
    advertise: str = _opt("advertise"),
    shard_id: int = _opt("shard_id"),
    threads: int = _opt("server.threads"),
    compute_threads: int = _opt("compute_threads"),
    step_timeout: float = _opt("step_timeout"),
    first_message_timeout: float = _opt("first_message_timeout"),
    streams_per_host: int = _opt("streams_per_host"),
    port_file: str = _opt("port_file"),
    checkpoint_dir: str = _opt("checkpoint_dir"),
    checkpoint_every: int = _opt("server.checkpoint_every"),
    checkpoint_keep: int = _opt("checkpoint_keep"),
    metrics_port: int = _METRICS_PORT,
    history_dir: str = _opt("history_dir"),
    data_port: int = _opt("data_port"),
    link_parts: int = _opt("link_parts"),
    log_level: str = _LOG_LEVEL,
):
    """Run a shard server (one slice of the parameters and its optimizer state)."""
    from ..server.main import ServerConfig, serve

    _setup_logging(log_level)
    try:
        config = ServerConfig(coordinator=coordinator, host=host, port=port, advertise=advertise, shard_id=shard_id,
                              threads=threads, compute_threads=compute_threads, step_timeout=step_timeout,
                              first_message_timeout=first_message_timeout, streams_per_host=streams_per_host,
                              port_file=port_file,
                              checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every,
                              checkpoint_keep=checkpoint_keep, metrics_port=metrics_port, history_dir=history_dir,
                              data_port=data_port, link_parts=link_parts)
    except ValueError as exc:
        _fail(str(exc))
    serve(config)


@app.command()
def worker(
    cluster: str = _opt("cluster"),
    workload: str = _TRAIN["workload"],
    mode: str = _TRAIN["mode"],
    optimizer: str = _TRAIN["optimizer"],
    lr: float = _TRAIN["lr"],
    batch_size: int = _TRAIN["batch_size"],
    steps: int = _TRAIN["steps"],
    epochs: float = _TRAIN["epochs"],
    device: str = _TRAIN["device"],
    seed: int = _TRAIN["seed"],
    min_workers: int = _opt("min_workers"),
    wire_dtype: str = _TRAIN["wire_dtype"],
    pull_dtype: str = _TRAIN["pull_dtype"],
    transport: str = _TRAIN["transport"],
    backup_workers: int = _TRAIN["backup_workers"],
    staleness: int = _TRAIN["staleness"],
    staleness_lr: bool = _TRAIN["staleness_lr"],
    topk_ratio: float = _TRAIN["topk_ratio"],
    balance_every: int = _TRAIN["balance_every"],
    replicas: int = _TRAIN["replicas"],
    amp: str = _TRAIN["amp"],
    sync_every: int = _TRAIN["sync_every"],
    fragments: int = _TRAIN["fragments"],
    outer_lr: float = _TRAIN["outer_lr"],
    outer_momentum: float = _TRAIN["outer_momentum"],
    slowdown: float = _opt("slowdown"),
    metrics: str = _opt("metrics"),
    tensorboard: str = _opt("tensorboard"),
    metrics_port: int = _METRICS_PORT,
    eval_every: int = _TRAIN["eval_every"],
    threads: int = _opt("worker.threads"),
    name: str = _opt("name"),
    connect_timeout: float = _opt("connect_timeout"),
):
    """Train a built-in workload as one worker of the cluster (rank from the coordinator)."""
    from ..worker.train import TrainConfig, train

    with _user_errors(cluster):
        config = TrainConfig(cluster=cluster, workload=workload, mode=mode, optimizer=optimizer, lr=lr,
                             batch_size=batch_size, steps=steps, epochs=epochs, device=device, seed=seed,
                             min_workers=min_workers, wire_dtype=wire_dtype, pull_dtype=pull_dtype, transport=transport,
                             backup_workers=backup_workers,
                             staleness=staleness, staleness_lr=staleness_lr, slowdown=slowdown,
                             topk_ratio=topk_ratio, balance_every=balance_every, replicas=replicas, amp=amp,
                             sync_every=sync_every, fragments=fragments, outer_lr=outer_lr, outer_momentum=outer_momentum,
                             metrics=metrics,
                             tensorboard=tensorboard, eval_every=eval_every,
                             threads=threads, name=name, connect_timeout=connect_timeout, metrics_port=metrics_port)
        result = train(config)
    typer.echo(json.dumps(result))


@app.command()
def run(
    servers: int = _opt("servers"),
    workers: int = _opt("workers"),
    workload: str = _TRAIN["workload"],
    mode: str = _TRAIN["mode"],
    optimizer: str = _TRAIN["optimizer"],
    lr: float = _TRAIN["lr"],
    batch_size: int = _TRAIN["batch_size"],
    steps: int = _TRAIN["steps"],
    epochs: float = _TRAIN["epochs"],
    device: str = _TRAIN["device"],
    seed: int = _TRAIN["seed"],
    wire_dtype: str = _TRAIN["wire_dtype"],
    pull_dtype: str = _TRAIN["pull_dtype"],
    transport: str = _TRAIN["transport"],
    backup_workers: int = _TRAIN["backup_workers"],
    staleness: int = _TRAIN["staleness"],
    staleness_lr: bool = _TRAIN["staleness_lr"],
    topk_ratio: float = _TRAIN["topk_ratio"],
    balance_every: int = _TRAIN["balance_every"],
    replicas: int = _TRAIN["replicas"],
    amp: str = _TRAIN["amp"],
    sync_every: int = _TRAIN["sync_every"],
    fragments: int = _TRAIN["fragments"],
    outer_lr: float = _TRAIN["outer_lr"],
    outer_momentum: float = _TRAIN["outer_momentum"],
    slow_worker: list[str] = typer.Option([], "--slow-worker",
                                          help="INDEX:FACTOR simulates worker-INDEX running FACTOR times slower."),
    eval_every: int = _TRAIN["eval_every"],
    hosts: bool = typer.Option(False, "--hosts", help="Run every role in its own network namespace (root)."),
    scenario: str = _opt("scenario", "--scenario"),
    checkpoint_every: int = _opt("run.checkpoint_every"),
    durable: bool = _opt("durable", "--durable/--no-durable"),
    resume: str = typer.Option("", "--resume", help="Go on from the checkpoints of this run directory "
                               "(any --servers; --steps counts from step 0)."),
    out: str = _opt("out", "--out"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of a table."),
):
    """Train on an embedded local cluster (coordinator + servers + workers), then report."""
    from ..client.run import RunConfig, run as run_job

    with _user_errors():
        config = RunConfig(servers=servers, workers=workers, workload=workload, mode=mode, optimizer=optimizer, lr=lr,
                           batch_size=batch_size, steps=steps, epochs=epochs, device=device, seed=seed,
                           wire_dtype=wire_dtype, pull_dtype=pull_dtype, transport=transport, backup_workers=backup_workers,
                           staleness=staleness,
                           staleness_lr=staleness_lr, topk_ratio=topk_ratio, balance_every=balance_every,
                           replicas=replicas, amp=amp, sync_every=sync_every, fragments=fragments, outer_lr=outer_lr,
                           outer_momentum=outer_momentum,
                           slow_workers=_parse_slow(slow_worker), eval_every=eval_every, out=out, hosts=hosts,
                           scenario=scenario, checkpoint_every=checkpoint_every, durable=durable, resume=resume)
        if as_json or not sys.stdout.isatty():
            summary = run_job(config, _plain_progress() if not as_json else None)
        else:
            from .display import live_progress

            with live_progress(config) as show:
                summary = run_job(config, show)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        from .display import print_summary

        print_summary(summary)


def _parse_slow(specs: list[str]) -> dict[int, float]:
    out = {}
    for spec in specs:
        index, _, factor = spec.partition(":")
        try:
            out[int(index)] = float(factor)
        except ValueError:
            raise ValueError(f"--slow-worker takes INDEX:FACTOR (e.g. 0:4), got {spec!r}") from None
    return out


def _plain_progress():
    """Progress for logs and pipes: one line every ~10 steps."""
    last = [-10]

    def show(p):
        if p.step >= last[0] + 10 or (p.steps and p.step == p.steps - 1 and last[0] != p.step):
            last[0] = p.step
            loss = f"{p.loss:.4f}" if p.loss is not None else "-"
            print(f"step {p.step + 1}/{p.steps} loss {loss} samples/s {p.samples_per_s:.0f} "
                  f"versions {p.versions}", flush=True)

    return show


@app.command(context_settings={"allow_interspersed_args": False, "ignore_unknown_options": True})
def launch(
    script: str = typer.Argument(..., help="The training script (a Python file; a module with -m)."),
    script_args: list[str] = typer.Argument(None, help="The script's own arguments (everything after it)."),
    nproc: int = typer.Option(1, "--nproc", "--nproc-per-node", help="Worker processes on this machine."),
    servers: int = typer.Option(2, "--servers", help="Shard servers of the embedded cluster."),
    cluster: str = typer.Option("", "--cluster", help="Join this running coordinator (host:port) instead."),
    min_workers: int = typer.Option(0, "--min-workers",
                                    help="Workers the job starts with (0: --nproc; across machines: the total)."),
    restart_on_failure: int = typer.Option(0, "--restart-on-failure",
                                           help="Start a failed worker again up to K times; it rejoins the job."),
    lease_seconds: float = _opt("lease_seconds", "--lease-seconds", env=False,
                                help="Embedded cluster: a dead worker leaves the job after this long."),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Embedded cluster: checkpoint every N steps."),
    log_dir: str = typer.Option("", "--log-dir", help="Logs and launch.json (default runs/launch-<time>)."),
    module: bool = typer.Option(False, "-m", "--module", help="SCRIPT is a module: run python -m SCRIPT."),
):
    """Run N copies of your training script as workers (torchrun for parameter servers): starts a local
    cluster unless --cluster is given; scripts find it through SHARDPS_CLUSTER (ShardedOptimizer reads it)."""
    from .launch import LaunchConfig, launch as run_launch

    with _user_errors(cluster):
        config = LaunchConfig(script=script, args=tuple(script_args or ()), nproc=nproc, servers=servers,
                              cluster=cluster, min_workers=min_workers, restart_on_failure=restart_on_failure,
                              lease_seconds=lease_seconds, checkpoint_every=checkpoint_every, log_dir=log_dir,
                              module=module)
        code = run_launch(config)
    raise typer.Exit(code=code)


@app.command()
def status(
    cluster: str = _opt("cluster"),
    job: str = typer.Option("", "--job", help="The job's name (default: the job named default)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Job, mode, membership and every shard's counters."""
    from .sdk import cluster_status

    with _user_errors(cluster):
        st = cluster_status(cluster, job)
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        from .display import print_status

        print_status(st)


@app.command()
def check(
    run_dir: str = typer.Argument(..., help="A run folder (shardps run --out), a LocalCluster log folder, or its "
                                            "history/ folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Prove the promises over a run's recorded history: applied once, nothing acknowledged lost, one
    primary at a time, backups equal to their primary. Exits 1 naming the events behind a violation."""
    from ..chaos.checker import check_run

    try:
        verdict = check_run(run_dir)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if as_json:
        typer.echo(json.dumps(verdict.as_dict(), indent=2))
    else:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(verdict.counts.items()))
        typer.echo(f"{'OK' if verdict.ok else 'VIOLATED'}: {counts}")
        for line in verdict.incomplete:
            typer.echo(f"incomplete: {line}")
        for v in verdict.violations:
            typer.echo(str(v))
    if not verdict.ok:
        raise typer.Exit(1)


@app.command()
def export(
    cluster: str = _opt("cluster", default=""),
    from_checkpoint: str = typer.Option("", "--from-checkpoint",
                                        help="Read the shards' checkpoints in this run or checkpoint folder instead."),
    out: str = typer.Option(..., "--out", help="Output file: .safetensors, or .pt for torch.save."),
    optimizer_state: bool = typer.Option(False, "--optimizer-state", help="Also write <stem>.optim.pt."),
    job: str = typer.Option("", "--job", help="The job's name (default: the job named default)."),
):
    """Assemble the model's state_dict from the shards (or their checkpoints) into one file: it loads
    with model.load_state_dict(strict=True) (buffers and tied names included)."""
    if bool(cluster) == bool(from_checkpoint):
        _fail("give --cluster HOST:PORT (a running cluster) or --from-checkpoint DIR (its checkpoints)")
    if from_checkpoint:
        from .resume import export_checkpoint

        with _user_errors():
            result = export_checkpoint(from_checkpoint, out, optimizer_state=optimizer_state)
        typer.echo(json.dumps(result))
        return
    from .sdk import export_model

    with _user_errors(cluster):
        result = export_model(cluster, out, optimizer_state=optimizer_state, job=job)
    typer.echo(json.dumps(result))


@app.command()
def probe(
    address: str = typer.Argument(..., help="host:port of a coordinator or shard server."),
    timeout: float = typer.Option(3.0, help="Seconds to wait for the answer."),
):
    """Exit 0 when the role at ADDRESS answers SERVING on the gRPC health service (a container healthcheck)."""
    from ..runtime.rpc import check_health

    if not check_health(address, timeout=timeout):
        _fail(f"{address} is not serving (gRPC health check)", 1)


@app.command()
def checkpoint(
    cluster: str = _opt("cluster", default="", help=CLUSTER_HELP + " (or --run)"),
    run: str = typer.Option("", "--run", help="A `shardps run` directory: its cluster and credential."),
    job: str = typer.Option("", "--job", help="The job's name (default: the job named default)."),
    timeout: float = typer.Option(120.0, help="Seconds to wait for every shard to reach the version and write."),
):
    """Checkpoint every shard at one common version (servers need --checkpoint-dir). An operator's
    call: it needs the cluster's credential (SHARDPS_CLUSTER_TOKEN, or --run of a `shardps run`)."""
    from .sdk import checkpoint_cluster

    cluster, security = _operator(cluster, run)
    with _user_errors(cluster):
        written = checkpoint_cluster(cluster, timeout, job, security)
    typer.echo(json.dumps(written, indent=2))


def _operator(cluster: str, run: str):
    """(coordinator address, credentials) for an operator's call: ``--run DIR`` gives both (the run's
    coordinator and the credential it made up); else the address and SHARDPS_CLUSTER_TOKEN."""
    from ..runtime.security import Security

    if not run:
        if not cluster:
            _fail("give --cluster HOST:PORT (with SHARDPS_CLUSTER_TOKEN set) or --run DIR of a `shardps run`")
        return cluster, Security.from_env()
    logs = Path(run) / "logs"
    try:
        token = (logs / "cluster.token").read_text().strip()
        address = cluster or f"127.0.0.1:{int((logs / 'coordinator.port').read_text())}"
    except (OSError, ValueError):
        _fail(f"{run} is not the directory of a running `shardps run` (no logs/cluster.token or "
              "logs/coordinator.port); pass the run's --out directory")
    base = Security.from_env()
    return address, Security(base.token, token, base.tls_cert, base.tls_key, base.tls_ca)


chaos_app = typer.Typer(no_args_is_help=True, help="Inject faults into a running cluster (experiments).")
app.add_typer(chaos_app, name="chaos")


@chaos_app.command("rpc")
def chaos_rpc(
    cluster: str = _opt("cluster", default="", help=CLUSTER_HELP + " (or --run)"),
    run: str = typer.Option("", "--run", help="A `shardps run` directory: its cluster and credential."),
    target: str = typer.Option("servers", help="coordinator, server-<k>, servers or all."),
    kind: str = typer.Option("", help="delay, abort or drop (leave out with --clear or --list)."),
    method: str = typer.Option("*", help="RPC name (Push, Pull, RegisterWorker, ...) or * for all."),
    worker: int = typer.Option(-1, help="Only calls from this worker id (-1: any)."),
    probability: float = typer.Option(1.0, help="Chance that a matching call is faulted."),
    delay: float = typer.Option(0.0, "--delay", help="delay: seconds to hold each call."),
    status: str = typer.Option("UNAVAILABLE", help="abort: the gRPC status code to fail with."),
    after: bool = typer.Option(False, "--after", help="Run the call first, then lose its reply."),
    max_active: int = typer.Option(0, help="At most this many calls faulted at once (0: no cap)."),
    count: int = typer.Option(0, help="Stop after this many faults (0: no limit)."),
    duration: float = typer.Option(0.0, "--for", help="Remove the rule after this many seconds (0: never)."),
    clear: bool = typer.Option(False, "--clear", help="Remove every rule on the target first."),
    list_: bool = typer.Option(False, "--list", help="Only show the active rules and fault counts."),
):
    """Delay, abort or drop RPCs on coordinator or servers, by method, worker and probability. An
    operator's call: it needs the cluster's credential (SHARDPS_CLUSTER_TOKEN, or --run)."""
    from ..runtime.faults import FaultRule
    from .. import chaos

    cluster, security = _operator(cluster, run)
    with _user_errors(cluster):
        if list_:
            shown = chaos.get_rpc_faults(cluster, target, security)
        else:
            if not kind and not clear:
                raise ValueError("give --kind delay|abort|drop, or --clear / --list")
            rules = [FaultRule(kind=kind, method=method, worker_id=None if worker < 0 else worker,
                               probability=probability, delay_s=delay, status=status, after=after,
                               max_active=max_active, max_count=count, duration_s=duration)] if kind else []
            shown = {name: {"rules": active}
                     for name, active in chaos.set_rpc_faults(cluster, target, rules, clear, security).items()}
    typer.echo(json.dumps({name: {**role, "rules": [chaos.rule_dict(r) for r in role["rules"]]}
                           for name, role in shown.items()}, indent=2))


def _chaos_on_run(action: str, target: str, run_dir: str, params: dict, timeout: float, compose: str = "") -> None:
    from .. import chaos

    if bool(run_dir) == bool(compose):
        _fail("give --run DIR (a running `shardps run`) or --compose PROJECT (a docker-compose cluster)")
    if compose:
        from ..chaos.compose import ComposeCluster, ComposeError

        try:
            name = ComposeCluster(compose).do(action, target, params)
        except ComposeError as exc:
            _fail(str(exc), 1)
        typer.echo(json.dumps({"ok": True, "container": name, "action": action}))
        return
    with _user_errors():
        try:
            answer = chaos.request(run_dir, action, target, params, timeout)
        except TimeoutError as exc:
            _fail(str(exc), 1)
    typer.echo(json.dumps(answer))
    if not answer["ok"]:
        _fail(f"{action} {target} failed: {answer['error']}", 1)


_RUN_DIR = typer.Option("", "--run", help="The --out directory of a running `shardps run`.")
_COMPOSE = typer.Option("", "--compose",
                        help="Or a docker-compose project: act on its containers (services or container names).")
_TARGET = typer.Argument(..., help="coordinator, server-<k> or worker-<i>.")


def _process_fault(action: str, doc: str) -> None:
    """Register `shardps chaos ACTION TARGET (--run DIR | --compose PROJECT)`."""

    def command(target: str = _TARGET, run: str = _RUN_DIR, compose: str = _COMPOSE,
                timeout: float = typer.Option(120.0)):
        _chaos_on_run(action, target, run, {}, timeout, compose)

    command.__doc__ = doc
    chaos_app.command(action)(command)


for _action, _doc in (
    ("kill", "SIGKILL a process of a running `shardps run` (docker kill with --compose)."),
    ("pause", "SIGSTOP a process (docker pause) until `shardps chaos resume`."),
    ("resume", "SIGCONT a paused process (docker unpause)."),
    ("restart", "Restart a process or container (a server restores its checkpoint)."),
):
    _process_fault(_action, _doc)


@chaos_app.command("link")
def chaos_link(
    target: str = _TARGET,
    run: str = _RUN_DIR,
    delay_ms: float = typer.Option(0.0, help="Added latency on the host's link (0: none)."),
    loss: float = typer.Option(0.0, help="Packet loss in percent (0: none)."),
    rate_kbit: int = typer.Option(0, help="Rate limit in kbit/s (0: none)."),
    partition: bool = typer.Option(False, "--partition", help="Cut the link."),
    heal: bool = typer.Option(False, "--heal", help="Reconnect a cut link."),
    compose: str = _COMPOSE,
    timeout: float = typer.Option(120.0),
):
    """Network faults on a host's link of a `shardps run --hosts` (all zero: a clean link again)."""
    if partition or heal:
        _chaos_on_run("partition" if partition else "heal", target, run, {}, timeout, compose)
    elif compose:
        _fail("with --compose, links can be cut (--partition) and healed (--heal); latency and loss need --run "
              "of a `shardps run --hosts`")
    elif delay_ms or loss or rate_kbit:
        _chaos_on_run("link", target, run, {"delay_ms": delay_ms, "loss": loss, "rate_kbit": rate_kbit}, timeout)
    else:
        _chaos_on_run("unlink", target, run, {}, timeout)


def _token_from_file() -> None:
    """SHARDPS_AUTH_TOKEN_FILE and SHARDPS_CLUSTER_TOKEN_FILE (Docker/Swarm secrets, /run/secrets/NAME):
    the tokens, unless the plain variables are set. Read here, at the edge, so every role and client
    below sees the plain variables."""
    for name in ("SHARDPS_AUTH_TOKEN", "SHARDPS_CLUSTER_TOKEN"):
        path = os.environ.get(name + "_FILE", "")
        if path and not os.environ.get(name):
            try:
                os.environ[name] = Path(path).read_text().strip()
            except OSError as exc:
                typer.echo(f"error: cannot read {name}_FILE {path}: {exc.strerror}; mount the secret "
                           f"there or set {name}", err=True)
                sys.exit(1)


def main() -> None:
    """The console script: click's own usage errors become one `error:` line too."""
    try:
        _token_from_file()
        code = app(standalone_mode=False)
    except typer.Abort:
        code = 130
    except typer.TyperException as exc:  # typer's (vendored) click usage errors
        if type(exc).__name__ == "NoArgsIsHelpError":
            exc.show()  # bare `shardps`: the help text
            sys.exit(0)
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "shardps"
        typer.echo(f"error: {exc.format_message()} (see '{command} --help')", err=True)
        code = getattr(exc, "exit_code", 2)
    sys.exit(code if isinstance(code, int) else 0)
