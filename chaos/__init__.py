"""The fault lab: everything that breaks a cluster on purpose, and records what it did.

    faults.py       RPC fault rules (abort, delay, lose the reply) and the interceptor every role's
                    gRPC server carries, with the AdminService that sets them
    control.py      set / clear / read those rules on any role by name; ask a running `shardps run`
                    for a process or network fault now
    scenario.py     a TOML schedule of faults by step or time, and the runner that fires them
    netns.py        roles in their own network namespaces: partitions, loss, delay, rate limits
    delay_proxy.py  latency for kernels without netem (a TCP proxy netns.py starts)
    compose.py      the same process faults against a docker-compose cluster
    report.py       the run's fault report: timeline, counters, rollbacks, per-step series

The roles import only ``faults`` (their servers carry the interceptor); the SDK and the CLI
import the rest. ``from shardps import chaos`` gives the rule API:

    chaos.set_rpc_faults(cluster, "servers", [chaos.FaultRule(kind="abort", method="Push")])
"""
from .control import clear_rpc_faults, get_rpc_faults, request, rule_dict, set_rpc_faults
from .faults import FaultRule

__all__ = ["FaultRule", "clear_rpc_faults", "get_rpc_faults", "request", "rule_dict", "set_rpc_faults"]
