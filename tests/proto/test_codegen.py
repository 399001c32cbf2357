"""The committed generated code is exactly what the pinned generator makes from the .proto."""
import importlib.util
import subprocess
import zipfile
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools (dev extra) not installed")
def test_regenerating_protos_leaves_no_diff(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    committed = ROOT / "proto" / "gen"
    names = sorted(p.name for p in tmp_path.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))
    for name in names:
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{name} is stale: run scripts/gen_protos.py"


def test_wheel_installs_only_the_shardps_package(tmp_path):
    """The role folders ship as shardps.server etc.; no top-level `server`/`worker`/`client` module."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("shardps-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"shardps", next(t for t in top if t.endswith(".dist-info"))}
    for module in ("proto/gen/shardps_pb2.py", "server/state.py", "coordinator/state.py", "worker/optimizer.py",
                   "client/local.py", "proto/shardps/v1/shardps.proto"):
        assert f"shardps/{module}" in names
    assert not any(n.startswith("shardps/tests/") for n in names)
