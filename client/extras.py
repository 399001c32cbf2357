"""Optional dependencies: import one, or fail in one line that names the command installing it.

    plt = require("matplotlib.pyplot", "the run's plots")   # MissingExtra: ... pip install 'shardps[plots]'

Core installs (``pip install shardps``) run every command; what an extra adds is a
file beside the results (plots, TensorBoard events) or a check in CI. Where such a
file is a side product (``shardps run``'s plot) the caller records the message as a
note instead of failing the run.
"""
from __future__ import annotations

import importlib
import importlib.util

# Top-level module -> the extra that installs it (pyproject.toml's optional-dependencies).
EXTRA_OF = {"matplotlib": "plots", "tensorboard": "tb", "kubernetes_validate": "dev", "yaml": "dev"}


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message is the one line to show."""


def install_hint(module: str) -> str:
    top = module.split(".")[0]
    return f"pip install 'shardps[{EXTRA_OF.get(top, 'dev')}]'"


def available(module: str) -> bool:
    return importlib.util.find_spec(module.split(".")[0]) is not None


def require(module: str, purpose: str):
    """``import module``, or raise MissingExtra saying what needs it and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}: {install_hint(module)}") from None
