"""SHARDPS_AUTH_TOKEN_FILE: the token from a file (a Docker/Swarm secret under /run/secrets), read by the
`shardps` command for every role and client; a missing file is a one-line error."""
import json
import os
import subprocess
import sys

import pytest

from shardps import LocalCluster


def shardps(*args, env):
    return subprocess.run([sys.executable, "-m", "shardps", *args], capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items() if not k.startswith("SHARDPS_")}, **env})


@pytest.mark.slow
def test_the_token_file_authenticates_a_client_and_a_missing_file_is_named(tmp_path):
    secret = tmp_path / "shardps_auth_token"
    secret.write_text("s3cret-from-a-file\n")  # secrets often end in a newline
    with LocalCluster(servers=1, auth_token="s3cret-from-a-file") as cluster:
        ok = shardps("status", "--cluster", cluster.address, "--json", env={"SHARDPS_AUTH_TOKEN_FILE": str(secret)})
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["num_servers"] == 1
        refused = shardps("status", "--cluster", cluster.address, env={})
        assert refused.returncode == 1 and "SHARDPS_AUTH_TOKEN" in refused.stderr
    missing = shardps("status", "--cluster", "127.0.0.1:1", env={"SHARDPS_AUTH_TOKEN_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 1 and "cannot read SHARDPS_AUTH_TOKEN_FILE" in missing.stderr
