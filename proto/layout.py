"""The flat layout: a model's trainable parameters laid end to end as one vector.

Parameters appear in ``named_parameters()`` order. The fingerprint hashes names and
shapes (not dtypes): a worker may hold its replica in its own dtype (a bf16 CUDA
box beside fp32 CPU boxes) while the servers keep one fp32 master, so only names
and shapes must agree. The dtypes are recorded so an export restores them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

SUPPORTED_PARAM_DTYPES = ("float32", "float64", "float16", "bfloat16")


@dataclass(frozen=True)
class ParamEntry:
    """One parameter: its name, shape, dtype name (torch's, e.g. "float32") and flat offset."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class Layout:
    params: tuple[ParamEntry, ...]
    numel: int
    fingerprint: str

    @classmethod
    def from_shapes(cls, entries: Iterable[tuple[str, tuple[int, ...], str]]) -> "Layout":
        """Build a layout from (name, shape, dtype name) triples in order."""
        params, offset, seen = [], 0, set()
        for name, shape, dtype in entries:
            if name in seen:
                raise ValueError(f"parameter name {name!r} appears twice; names must be unique")
            if dtype not in SUPPORTED_PARAM_DTYPES:
                raise ValueError(
                    f"parameter {name!r} has dtype {dtype}; shardps trains floating-point "
                    f"parameters only ({', '.join(SUPPORTED_PARAM_DTYPES)})"
                )
            seen.add(name)
            entry = ParamEntry(name, tuple(int(d) for d in shape), dtype, offset)
            params.append(entry)
            offset += entry.numel
        return cls(tuple(params), offset, fingerprint_of((p.name, p.shape) for p in params))

    @classmethod
    def from_module(cls, named_parameters: Iterable) -> "Layout":
        """Layout of ``model.named_parameters()`` (trainable ones only)."""
        entries = []
        for name, p in named_parameters:
            if p.requires_grad:
                entries.append((name, tuple(p.shape), str(p.dtype).removeprefix("torch.")))
        if not entries:
            raise ValueError("the model has no trainable parameters (requires_grad=True)")
        return cls.from_shapes(entries)

    def entry(self, name: str) -> ParamEntry:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no parameter named {name!r} in the layout")


def fingerprint_of(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Hex SHA-256 over the ordered (name, shape) pairs."""
    payload = json.dumps([[n, list(s)] for n, s in names_and_shapes], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
