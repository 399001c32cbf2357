"""The ``shardps`` command: thin typer commands over the SDK and the role entry points.

    shardps coordinator --port 7070 --num-servers 2
    shardps server --coordinator 127.0.0.1:7070 --port 7071
    shardps status --cluster 127.0.0.1:7070

Every option can also be set by its ``SHARDPS_*`` environment variable (shown in --help).
"""
from __future__ import annotations

import logging
import sys

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="shardps: a parameter server for PyTorch.")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def coordinator(
    host: str = typer.Option("127.0.0.1", envvar="SHARDPS_HOST", help="Interface to bind; 0.0.0.0 in containers."),
    port: int = typer.Option(7070, envvar="SHARDPS_PORT", help="Port to serve on; 0 picks a free one."),
    num_servers: int = typer.Option(2, envvar="SHARDPS_NUM_SERVERS", help="Shard servers the parameters are cut across."),
    threads: int = typer.Option(32, envvar="SHARDPS_THREADS", help="gRPC handler threads."),
    port_file: str = typer.Option("", envvar="SHARDPS_PORT_FILE", help="Write the bound port to this file."),
    log_level: str = typer.Option("info", envvar="SHARDPS_LOG_LEVEL"),
):
    """Run the coordinator (job spec, shard plan, membership)."""
    from ..coordinator.main import CoordinatorConfig, serve

    _setup_logging(log_level)
    try:
        config = CoordinatorConfig(host, port, num_servers, threads, port_file)
    except ValueError as exc:
        _fail(str(exc))
    serve(config)


@app.command()
def server(
    coordinator: str = typer.Option(..., envvar="SHARDPS_COORDINATOR", help="Coordinator address, host:port."),
    host: str = typer.Option("127.0.0.1", envvar="SHARDPS_HOST", help="Interface to bind; 0.0.0.0 in containers."),
    port: int = typer.Option(7071, envvar="SHARDPS_PORT", help="Port to serve on; 0 picks a free one."),
    advertise: str = typer.Option("", envvar="SHARDPS_ADVERTISE", help="host:port workers dial (default host:port)."),
    shard_id: int = typer.Option(-1, envvar="SHARDPS_SHARD_ID", help="Shard id; -1 lets the coordinator assign one."),
    threads: int = typer.Option(64, envvar="SHARDPS_THREADS", help="gRPC handler threads (>= workers + 8)."),
    step_timeout: float = typer.Option(300.0, envvar="SHARDPS_STEP_TIMEOUT", help="Sync: seconds a push waits for its step."),
    port_file: str = typer.Option("", envvar="SHARDPS_PORT_FILE", help="Write the bound port to this file."),
    log_level: str = typer.Option("info", envvar="SHARDPS_LOG_LEVEL"),
):
    """Run a shard server (one slice of the parameters and its optimizer state)."""
    from ..server.main import ServerConfig, serve

    _setup_logging(log_level)
    try:
        config = ServerConfig(coordinator=coordinator, host=host, port=port, advertise=advertise, shard_id=shard_id,
                              threads=threads, step_timeout=step_timeout, port_file=port_file)
    except ValueError as exc:
        _fail(str(exc))
    serve(config)


def main() -> None:
    app()
