"""shardps.proto: the contract every role shares.

- ``shardps/v1/shardps.proto`` and the generated ``gen/`` modules: the gRPC wire format.
- ``plan``: the shard plan, a pure function from (numel, num_shards) to half-open ranges.
- ``layout``: the flat layout of a model's parameters and its fingerprint.
- ``codec``: tensors <-> TensorChunk messages (raw little-endian bytes + dtype + shape).
- ``messages``: plain dataclasses <-> protobuf messages for job specs and plans.
- ``wire``, ``assemble``, ``buffers``, ``optim``: the byte layouts and optimizer names both ends read.
- ``errors``: the typed failure reasons; ``defaults``: every default and its help text.

Only the contract lives here: nothing opens a socket, starts a thread or a process, or
touches a file; that is ``runtime`` (channels, the server factory, security, shared
memory, metrics). Nothing here imports ``runtime`` or any role (``tests/test_layers.py``).
``plan`` and ``layout`` do not import torch, so the coordinator starts without it.
"""
