"""proto/defaults.py is the one source of every option's default, help and variable: the CLI, the
config dataclasses and docs/configuration.md agree with it, and it lists every SHARDPS_* name read."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path

import typer.main

from shardps.client.cli import app
from shardps.client.launch import LaunchConfig
from shardps.client.run import RunConfig
from shardps.coordinator.main import CoordinatorConfig
from shardps.proto import defaults, optim
from shardps.server.main import ServerConfig
from shardps.worker.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
NAME = re.compile(r"\bSHARDPS_[A-Z0-9_]+")


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _names_in(paths) -> dict[str, str]:
    """SHARDPS_* names (not prefixes such as SHARDPS_TLS_) -> the first file using each."""
    found = {}
    for path in paths:
        for name in NAME.findall(path.read_text()):
            if not name.endswith("_"):
                found.setdefault(name, str(path.relative_to(ROOT)))
    return found


def test_committed_configuration_tables_equal_the_generated_ones():
    gen = _gen_docs()
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert gen.rewrite(page, gen.generated_tables()) == page, "run python scripts/gen_docs.py and commit it"
    assert "`SHARDPS_LEASE_SECONDS` | coordinator |" in page  # the table is really there, not an empty block


def test_every_shardps_variable_the_package_reads_is_in_the_defaults_module():
    # The package's own folders (not tests, benchmarks, build outputs or a .venv in the checkout).
    rooms = [d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name not in ("tests", "bench")]
    sources = [*ROOT.glob("*.py"), *(p for d in rooms for p in d.rglob("*.py") if "gen" not in p.parts)]
    assert ROOT / "runtime" / "security.py" in sources
    missing = {name: where for name, where in _names_in(sources).items() if name not in defaults.env_names()}
    assert not missing, f"add these to proto/defaults.py (then run scripts/gen_docs.py): {missing}"


def test_every_shardps_variable_of_the_deployment_files_is_in_the_defaults_module():
    files = [ROOT / "docker-compose.yml", *ROOT.glob("scripts/*.sh"), *ROOT.glob("deploy/**/*.yml"),
             *ROOT.glob("deploy/*.example"), ROOT / "Dockerfile"]
    missing = {name: where for name, where in _names_in(f for f in files if f.is_file()).items()
               if name not in defaults.env_names()}
    assert not missing, f"add these to DEPLOY_SETTINGS (or SETTINGS) in proto/defaults.py: {missing}"


def test_optimizer_names_in_the_help_are_the_ones_the_shards_run():
    assert sorted(defaults.OPTIMIZER_NAMES) == sorted(optim.OPTIMIZERS)
    assert all(name in defaults.setting("optimizer").help for name in optim.OPTIMIZERS)


def _cli_options():
    """(command path, click option) for every option of every `shardps` command."""
    def walk(command, path):
        if hasattr(command, "commands"):  # a group (typer ships its own click: compare by shape)
            for name, sub in command.commands.items():
                yield from walk(sub, f"{path} {name}")
        else:
            for param in command.params:
                if param.param_type_name == "option":
                    yield path, param
    return list(walk(typer.main.get_command(app), "shardps"))


def test_every_cli_variable_has_the_defaults_module_default_and_help():
    checked = 0
    for path, option in _cli_options():
        if not option.envvar:
            continue
        candidates = [s for s in defaults.SETTINGS if s.env == option.envvar and s.name == option.name]
        assert candidates, f"{path} --{option.name}: {option.envvar} is not in proto/defaults.py under that name"
        matching = [s for s in candidates if s.default is None or s.default == option.default
                    or option.default == ""]  # export/checkpoint/chaos take --cluster or --run: not required there
        assert matching, f"{path} --{option.name}: default {option.default!r} differs from proto/defaults.py"
        assert any(option.help.startswith(s.help) for s in matching), f"{path} --{option.name}: help drifted"
        checked += 1
    assert checked > 60


# Config fields whose "" means "ask the environment, then the default" (not the default itself).
_FROM_ENV = {("TrainConfig", "transport"), ("RunConfig", "transport")}


def test_config_dataclass_defaults_equal_the_defaults_module():
    roles = {CoordinatorConfig: "coordinator", ServerConfig: "server", TrainConfig: "worker", RunConfig: "run",
             LaunchConfig: "launch"}
    compared = 0
    for cls, role in roles.items():
        for field in dataclasses.fields(cls):
            if field.default is dataclasses.MISSING or (cls.__name__, field.name) in _FROM_ENV:
                continue
            try:
                s = defaults.setting(f"{role}.{field.name}")
            except KeyError:
                try:
                    s = defaults.setting(field.name)
                except KeyError:
                    continue
            if s.default is None or (role == "launch" and field.name in ("checkpoint_every", "min_workers")):
                continue  # required ones; launch's own meanings: checkpoints only when asked, 0 workers = --nproc
            assert field.default == s.default, (f"{cls.__name__}.{field.name} = {field.default!r}, "
                                                f"proto/defaults.py says {s.default!r}")
            compared += 1
    assert compared > 40
