"""One worker of a realworld scenario: ``python worker.py SCENARIO --cluster ADDR --out FILE``.

Runs the scenario's training loop (``scenarios.py``) as a shardps worker and saves
what it returns (with this worker's rank) for the test to compare.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scenarios import SCENARIOS, Env  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=sorted(SCENARIOS))
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    env = Env(sharded=True, cluster=a.cluster, prefix=f"{a.scenario}-")
    try:
        result = SCENARIOS[a.scenario](env)
        torch.save({"rank": env.rank, **result}, a.out)
    finally:
        env.close()


if __name__ == "__main__":
    main()
