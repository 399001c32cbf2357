"""The flat layout: a job's parameters laid end to end as one vector, and the buffers beside them.

Parameters appear in the order the worker gives them (a module's
``named_parameters()`` order). The fingerprint hashes names and shapes (not
dtypes): a worker may hold its replica in its own dtype (a bf16 CUDA box beside
fp32 CPU boxes) while the servers keep one fp32 master, so only names and shapes
must agree. The dtypes are recorded so an export restores them. Each parameter
records its param group (torch.optim's ``param_groups``) and the other
state_dict names of the same tensor (tied weights), so an export loads with
``load_state_dict(strict=True)``.

A shard's *pieces* are the parts of the parameters inside its range, in layout
order: the optimizer on a shard steps one tensor per piece, so torch's per-parameter
semantics (a parameter without a gradient is skipped, per-group hyper-parameters,
per-parameter step counts) hold on every shard.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable

SUPPORTED_PARAM_DTYPES = ("float32", "float64", "float16", "bfloat16")
BUFFER_DTYPES = ("float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "int32", "int64", "bool")
MAX_NAME_CHARS = 1024  # a name longer than this is not a state_dict key anyone wrote
MAX_PARAMS = 1 << 20  # parameters (and buffers) per job
MAX_NUMEL = 1 << 40  # elements of the flat vector (4 TiB of fp32)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class ParamEntry:
    """One parameter: name, shape, dtype name (torch's, e.g. "float32"), flat offset, param
    group, and the other names the same tensor has in the model's state_dict."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    offset: int
    group: int = 0
    aliases: tuple[str, ...] = ()

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel


@dataclass(frozen=True)
class BufferEntry:
    """A persistent module buffer the job keeps (BatchNorm's running statistics, ...)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return _numel(self.shape)


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flat vector, all of parameter ``index`` (a layout index)."""

    index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


def check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
        raise ValueError(f"{what} name must be a non-empty string of at most {MAX_NAME_CHARS} characters")


def check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) > 16 or any(not isinstance(d, int) or d < 0 for d in shape):
        raise ValueError(f"{what} has shape {list(shape)}: dimensions must be >= 0 (at most 16 of them)")
    if _numel(shape) > MAX_NUMEL:
        raise ValueError(f"{what} has {_numel(shape)} elements, more than shardps's limit of {MAX_NUMEL}")


@dataclass(frozen=True)
class Layout:
    params: tuple[ParamEntry, ...]
    numel: int
    fingerprint: str

    @classmethod
    def from_shapes(cls, entries: Iterable[tuple], groups: int = 1) -> "Layout":
        """Build a layout from (name, shape, dtype name[, group[, aliases]]) tuples in order;
        ``groups`` is how many param groups the indices may name."""
        params, offset, seen = [], 0, set()
        for item in entries:
            name, shape, dtype = item[:3]
            group = int(item[3]) if len(item) > 3 else 0
            aliases = tuple(item[4]) if len(item) > 4 else ()
            shape = tuple(int(d) for d in shape)
            for n in (name, *aliases):
                check_name(n, "parameter")
                if n in seen:
                    raise ValueError(f"parameter name {n!r} appears twice; names must be unique")
                seen.add(n)
            check_shape(shape, f"parameter {name!r}")
            if dtype not in SUPPORTED_PARAM_DTYPES:
                raise ValueError(
                    f"parameter {name!r} has dtype {dtype}; shardps trains floating-point "
                    f"parameters only ({', '.join(SUPPORTED_PARAM_DTYPES)})"
                )
            if not 0 <= group < groups:
                raise ValueError(f"parameter {name!r} names param group {group}; the job has {groups}")
            entry = ParamEntry(name, shape, dtype, offset, group, aliases)
            params.append(entry)
            offset += entry.numel
            if len(params) > MAX_PARAMS or offset > MAX_NUMEL:
                raise ValueError(f"a job holds at most {MAX_PARAMS} parameters and {MAX_NUMEL} elements")
        if not params:
            raise ValueError("the model has no parameters to train")
        return cls(tuple(params), offset, fingerprint_of((p.name, p.shape) for p in params))

    def entry(self, name: str) -> ParamEntry:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"no parameter named {name!r} in the layout")

    def pieces(self, start: int, stop: int) -> list[Piece]:
        """The parts of the parameters inside [start, stop), in layout order (empty parameters
        own no elements and appear in no shard)."""
        out = []
        for i, e in enumerate(self.params):
            lo, hi = max(e.offset, start), min(e.stop, stop)
            if lo < hi:
                out.append(Piece(i, lo, hi))
        return out


def fingerprint_of(names_and_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """Hex SHA-256 over the ordered (name, shape) pairs."""
    payload = json.dumps([[n, list(s)] for n, s in names_and_shapes], separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
