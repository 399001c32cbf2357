"""Seeded generators of hostile calls for every RPC of every role (used by test_fuzz.py).

``random_message`` fills any request message from its protobuf descriptor with values
chosen to hurt: boundary and huge integers, NaN and infinities, empty, enormous and
odd strings, random bytes, nested messages, repeated fields of hostile sizes. Known
ids (the live job's id, its fingerprint) are mixed in so that calls get past the
first checks and reach deeper code. ``health_call`` and ``stalled_stream`` make the callers
who flood the health service or open request streams and send nothing.
"""
from __future__ import annotations

import math
import random

from google.protobuf.descriptor import FieldDescriptor as F
from grpc_health.v1 import health_pb2

from shardps.proto.gen import shardps_pb2 as pb

INTS = [0, 1, -1, 2, 7, 63, 64, 1000, 2 ** 31 - 1, 2 ** 31, 2 ** 40, 2 ** 62, -(2 ** 63), 2 ** 63 - 1]
# 1e-39 / 1e-30 / 1e39: loss scales whose unscale overflows float32 (they passed a finite >= 0 check)
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-45, 1e-39, 1e-30, 3e38, 1e39, 1e308, math.inf, -math.inf, math.nan]
STRINGS = ["", "x", "default", "*", "Push", "\x00", "ünï", "a" * 5000, '{"lr": 1}', "[{}]", "[" * 3000,
           '{"lr": "x"}', "h:1", "127.0.0.1:1"]

SERVICES = {
    "shardps.v1.CoordinatorService": pb.DESCRIPTOR.services_by_name["CoordinatorService"],
    "shardps.v1.ShardService": pb.DESCRIPTOR.services_by_name["ShardService"],
    "shardps.v1.AdminService": pb.DESCRIPTOR.services_by_name["AdminService"],
}


class Fuzzer:
    def __init__(self, seed: int, known_strings=(), avoid_ints=(), targets=(), no_targets=()):
        """``targets``: real ShardTargets, put into half of the calls that carry one, so those get
        past the job/range checks into deeper code (not into ``no_targets`` request types, for which
        a real target would make an empty request a legitimate action)."""
        self.rng = random.Random(seed)
        self.strings = STRINGS + list(known_strings)
        self.ints = [i for i in INTS if i not in set(avoid_ints)]
        self.targets, self.no_targets = list(targets), set(no_targets)

    def value(self, field, depth: int):
        r = self.rng
        t = field.type
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return max(-(2 ** 31), min(2 ** 31 - 1, r.choice(self.ints)))
        if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return r.choice(self.ints)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return abs(r.choice(self.ints)) % 2 ** 32
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return abs(r.choice(self.ints)) % 2 ** 64
        if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
            v = r.choice(FLOATS)
            return v if t == F.TYPE_DOUBLE or not math.isfinite(v) or abs(v) < 3.4e38 else 3e38
        if t == F.TYPE_BOOL:
            return r.random() < 0.5
        if t == F.TYPE_STRING:
            return r.choice(self.strings)
        if t == F.TYPE_BYTES:
            return bytes(r.getrandbits(8) for _ in range(r.choice([0, 1, 4, 17, 256])))
        if t == F.TYPE_ENUM:
            return r.choice([0, 1, 2, 3, 4, 9, 99, -1])
        raise TypeError(t)

    def fill(self, msg, depth: int = 0):
        """Set a random subset of ``msg``'s fields to hostile values (messages up to depth 3)."""
        r = self.rng
        for field in msg.DESCRIPTOR.fields:
            if r.random() < 0.3:
                continue
            if field.type == F.TYPE_MESSAGE:
                if depth >= 3:
                    continue
                if field.message_type.GetOptions().map_entry:
                    container = getattr(msg, field.name)
                    key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                    for _ in range(r.choice([0, 1, 3])):
                        key = self.value(key_f, depth)
                        if value_f.type == F.TYPE_MESSAGE:
                            self.fill(container[key], depth + 1)
                        else:
                            container[key] = self.value(value_f, depth)
                elif field.is_repeated:
                    for _ in range(r.choice([0, 1, 3])):
                        self.fill(getattr(msg, field.name).add(), depth + 1)
                else:
                    self.fill(getattr(msg, field.name), depth + 1)
            elif field.is_repeated:
                getattr(msg, field.name).extend(self.value(field, depth) for _ in range(r.choice([0, 1, 2, 5, 17])))
            else:
                setattr(msg, field.name, self.value(field, depth))
        return msg

    def request(self, method) -> object:
        cls = getattr(pb, method.input_type.name)
        msg = self.fill(cls())
        if self.targets and cls.__name__ not in self.no_targets and self.rng.random() < 0.5:
            holder = msg.header if cls is pb.PushRequest else msg
            if "target" in holder.DESCRIPTOR.fields_by_name:
                holder.target.CopyFrom(self.rng.choice(self.targets))
                if cls is pb.PushRequest and self.rng.random() < 0.5:
                    msg.header.epoch = 1
        return msg

    def stream(self, method) -> list:
        return [self.request(method) for _ in range(self.rng.choice([0, 1, 2, 4]))]

    def raw(self) -> bytes:
        return bytes(self.rng.getrandbits(8) for _ in range(self.rng.choice([0, 1, 3, 10, 100, 700])))

    # ---------------------------------------------------------------- callers who flood or stall

    def health_call(self) -> tuple[str, object, float]:
        """A grpc.health.v1 call: (method, request, deadline in seconds), mostly short-deadline Watches."""
        r = self.rng
        method = r.choices(["Watch", "Check", "List"], weights=[6, 3, 1])[0]
        request = (health_pb2.HealthListRequest() if method == "List"
                   else health_pb2.HealthCheckRequest(service=r.choice(["", "", *self.strings])))
        return method, request, r.choice([0.001, 0.01, 0.05, 0.05, 0.2, 1.0])

    def stalled_stream(self, method) -> list:
        """The messages a request stream sends before it stalls: mostly none (the caller never starts)."""
        return [] if self.rng.random() < 0.7 else [self.request(method)]
