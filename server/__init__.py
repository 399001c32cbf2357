"""shardps.server: a shard server owns the fp32 slice [start, stop) and its optimizer state.

Reading order: ``state.py`` (the slice and its optimizer) -> ``steps.py`` (what a policy and
the state say to each other) -> ``modes.py`` (sync/async policies) -> ``node.py`` (the process's shard before/after its job) -> ``service.py``
(the gRPC adapter) -> ``main.py`` (config, build_shard_server, serve).
"""
