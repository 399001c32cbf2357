"""Fault injection from the outside: RPC fault rules on any role, by name.

    from shardps import chaos
    rules = chaos.set_rpc_faults(cluster, "servers",
                                 [chaos.FaultRule(kind="abort", method="Push", status="UNAVAILABLE", probability=0.3)])
    ...
    chaos.clear_rpc_faults(cluster, "servers")

``cluster`` is a ``LocalCluster`` (whose operator credential is used) or a coordinator
address (then ``security``, or SHARDPS_CLUSTER_TOKEN in the environment, must hold the
cluster's credential: fault injection is an operator's call). Targets are named as in
``LocalCluster``: ``"coordinator"``, ``"server-<k>"``, ``"servers"`` (every shard
server) or ``"all"``; addresses come from the coordinator's status, so this works
against any running cluster. Process faults (kill, pause, restart) are
``LocalCluster`` methods and scenario actions.
"""
from __future__ import annotations

from ..runtime.faults import FaultRule, rule_from_pb, rule_to_pb
from ..proto.gen import shardps_pb2 as pb
from ..proto.gen import shardps_pb2_grpc as pb_grpc
from ..runtime.rpc import CONTROL_TIMEOUT_S, open_channel
from ..runtime.status import error_from_rpc


def endpoint(cluster, security=None):
    """(coordinator address, credentials) of a ``LocalCluster`` or an address."""
    if hasattr(cluster, "address"):
        return cluster.address, security if security is not None else cluster.admin_security
    return cluster, security


def resolve(cluster, target: str, security=None) -> dict[str, str]:
    """{name: address} of ``target`` ("coordinator", "server-<k>", "servers" or "all")."""
    import grpc

    cluster, security = endpoint(cluster, security)
    with open_channel(cluster, security) as channel:
        try:
            status = pb_grpc.CoordinatorServiceStub(channel).GetJobStatus(pb.GetJobStatusRequest(),
                                                                          timeout=CONTROL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"the coordinator at {cluster}") from None
    servers = {f"server-{s.shard_id}": s.address for s in status.servers}
    everyone = {"coordinator": cluster, **servers}
    if target == "all":
        return everyone
    if target == "servers":
        return servers
    if target in everyone:
        return {target: everyone[target]}
    raise ValueError(f"unknown target {target!r}; choose coordinator, servers, all or one of: {', '.join(servers)}")


def _admin(address: str, call, security=None):
    import grpc

    with open_channel(address, security) as channel:
        try:
            return call(pb_grpc.AdminServiceStub(channel))
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, f"AdminService at {address}") from None


def set_rpc_faults(cluster, target: str, rules: list[FaultRule], clear: bool = False,
                   security=None) -> dict[str, list[FaultRule]]:
    """Add ``rules`` (after clearing, with ``clear``) on every role ``target`` names; returns the
    active rules per role."""
    cluster, security = endpoint(cluster, security)
    request = pb.SetFaultsRequest(add=[rule_to_pb(r) for r in rules], clear=clear)
    return {name: [_rule(m) for m in _admin(address, lambda s: s.SetFaults(request, timeout=CONTROL_TIMEOUT_S),
                                            security).rules]
            for name, address in resolve(cluster, target, security).items()}


def clear_rpc_faults(cluster, target: str = "all", security=None) -> None:
    set_rpc_faults(cluster, target, [], clear=True, security=security)


def get_rpc_faults(cluster, target: str = "all", security=None) -> dict[str, dict]:
    """Per role: {"rules": [FaultRule...], "injected": {"kind/method": count}}."""
    cluster, security = endpoint(cluster, security)
    out = {}
    for name, address in resolve(cluster, target, security).items():
        reply = _admin(address, lambda s: s.GetFaults(pb.GetFaultsRequest(), timeout=CONTROL_TIMEOUT_S), security)
        out[name] = {"rules": [_rule(m) for m in reply.rules], "injected": dict(reply.injected)}
    return out


def _rule(msg: pb.FaultRule) -> FaultRule:
    rule = rule_from_pb(msg)
    rule.id, rule.injected = msg.id, msg.injected
    return rule


def rule_dict(rule: FaultRule) -> dict:
    """A rule as JSON-able data (for the CLI and reports)."""
    return {k: getattr(rule, k) for k in ("id", "kind", "method", "worker_id", "probability", "delay_s", "status",
                                          "after", "max_active", "max_count", "duration_s", "injected")}


def request(run_dir: str, action: str, target: str, params: dict | None = None, timeout: float = 120.0) -> dict:
    """Ask a running ``shardps run`` (its run directory) to do a process or network fault now.

    The run does it between two of its progress polls, records it in its fault timeline
    and report, and answers; returns {"ok", "error", "step", "detail"}.
    """
    import json
    import os
    import time
    import uuid
    from pathlib import Path

    control = Path(run_dir) / "control"
    pid_file = control / "pid"
    if not pid_file.exists():
        raise ValueError(f"no `shardps run` is running in {run_dir} (no {pid_file}); pass the run's --out directory")
    try:
        os.kill(int(pid_file.read_text()), 0)
    except (ProcessLookupError, ValueError):
        raise ValueError(f"the `shardps run` of {run_dir} is not running any more") from None
    name = f"{time.time_ns()}-{uuid.uuid4().hex[:6]}"
    tmp = control / f".{name}.tmp"
    tmp.write_text(json.dumps({"action": action, "target": target, "params": params or {}}))
    os.replace(tmp, control / f"{name}.json")  # the run never sees a half-written request
    done = control / f"{name}.done"
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            (control / f"{name}.json").unlink(missing_ok=True)
            raise TimeoutError(f"the run in {run_dir} did not act on the request within {timeout:.0f}s")
        time.sleep(0.1)
    answer = json.loads(done.read_text())
    done.unlink(missing_ok=True)
    return answer
