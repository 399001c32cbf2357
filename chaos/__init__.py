"""The fault lab: everything that breaks a cluster on purpose, and records what it did.

    control.py      set / clear / read RPC fault rules (abort, delay, lose the reply) on any role
                    by name; ask a running `shardps run` for a process or network fault now
    scenario.py     a TOML schedule of faults by step or time, and the runner that fires them
    netns.py        roles in their own network namespaces: partitions, loss, delay, rate limits
    delay_proxy.py  latency for kernels without netem (a TCP proxy netns.py starts)
    compose.py      the same process faults against a docker-compose cluster
    report.py       the run's fault report: timeline, counters, rollbacks, per-step series

The rules and the interceptor that applies them run inside every role, so they are runtime
(``runtime/faults.py``, installed by ``runtime.server.role_server``); no role imports this
package, only the SDK and the CLI do. ``from shardps import chaos`` gives the rule API:

    chaos.set_rpc_faults(cluster, "servers", [chaos.FaultRule(kind="abort", method="Push")])
"""
from .control import clear_rpc_faults, get_rpc_faults, request, rule_dict, set_rpc_faults
from ..runtime.faults import FaultRule

__all__ = ["FaultRule", "clear_rpc_faults", "get_rpc_faults", "request", "rule_dict", "set_rpc_faults"]
