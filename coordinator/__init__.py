"""shardps.coordinator: job spec, shard plan and membership (never tensors).

``state.Coordinator`` is the core, ``service`` the gRPC adapter, ``main`` the
process entry point, ``client.CoordinatorClient`` the stub other roles use.
"""
