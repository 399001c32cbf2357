"""shardps.runtime: what every role runs besides its own logic (sockets, threads, files, processes).

- ``rpc``: channels (options, credentials, the health probe) and the constants both ends share.
- ``status``: domain errors <-> gRPC statuses, the one mapping (the error types are ``proto.errors``).
- ``server``: the one server factory (``role_server``: auth, admission, idle-stream limits, the
  fault hook), ``bind`` and ``add_health``.
- ``security``: principals, tokens, TLS. ``limits``, ``admission``, ``health``: what keeps a server
  answering under load. ``faults``: the fault hook every role's server carries.
- ``retry``, ``process``, ``shm`` (same-host shared memory), ``history`` (the run's event log),
  ``metrics`` and ``gauges`` (Prometheus serving, and the typed copies a role hands it).

It imports ``proto`` (the contract) and nothing of the roles: ``server``, ``worker``,
``coordinator``, ``client`` and ``chaos`` import it, never the other way round
(``tests/test_layers.py`` holds the rule).
"""
