"""shardps: a parameter server for PyTorch over gRPC.

    from shardps import DiLoCo, LocalCluster, ShardedOptimizer

The repository root is this package; its role folders import as ``shardps.proto``,
``shardps.server``, ``shardps.coordinator``, ``shardps.worker`` and ``shardps.client``.
Names are resolved lazily so that processes which never train (the coordinator, the
CLI's status command) start without importing torch.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["DiLoCo", "LocalCluster", "ShardedOptimizer", "__version__"]


def __getattr__(name: str):
    if name == "ShardedOptimizer":
        from .worker.optimizer import ShardedOptimizer

        return ShardedOptimizer
    if name == "DiLoCo":
        from .worker.diloco import DiLoCo

        return DiLoCo
    if name == "LocalCluster":
        from .client.local import LocalCluster

        return LocalCluster
    raise AttributeError(f"module 'shardps' has no attribute {name!r}")
