"""shardps.worker: the worker side. ``ShardedOptimizer`` is the one class a training loop needs.

Reading order: ``optimizer.py`` (the proxy) -> ``flat.py`` (flatten/scatter) -> ``ps_client.py`` (fan-out).
"""
