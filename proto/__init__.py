"""shardps.proto: the contract every role shares.

- ``shardps/v1/shardps.proto`` and the generated ``gen/`` modules: the gRPC wire format.
- ``plan``: the shard plan, a pure function from (numel, num_shards) to half-open ranges.
- ``layout``: the flat layout of a model's parameters and its fingerprint.
- ``codec``: tensors <-> TensorChunk messages (raw little-endian bytes + dtype + shape).
- ``messages``: plain dataclasses <-> protobuf messages for job specs and plans.

Nothing here imports the server, worker or client packages. ``plan`` and ``layout``
do not import torch, so the coordinator starts without it.
"""
