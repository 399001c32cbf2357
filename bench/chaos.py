"""Chaos: SIGKILL a random role every T seconds (seeded) and restart it, N times over one sync
run of `shardps run`; the same run without faults beside it.

    python bench/chaos.py                                        # 6 failures, one every 6 s: servers, coordinator
    python bench/chaos.py --targets servers workers coordinator  # any role
    python bench/chaos.py --failures 3 --every 4 --steps 300     # short (what CI runs)
    python bench/chaos.py --failures 200 --every 1.5 --down 0.5 --steps 6000 --replicas 2 \
        --targets servers workers coordinator --kinds kill pause      # at scale: 200 failures over every role
    sudo python bench/chaos.py --replicas 2 --targets servers workers coordinator --kinds kill pause partition

The failures come from a ``[chaos]`` scenario (``chaos/scenario.py``), so ``shardps run --scenario``
does the same. Reported, per run: failures injected and survived (the role came back and the
run finished), steps rolled back (a killed server restores its last checkpoint and the job
replays from the newest common step), pushes applied twice (from the run's recorded history:
``shardps check`` proves every push was applied once per timeline, no acknowledged update was lost
and one primary applied at a time; its verdict is in the result), wall time against the fault-free run, and the final model
against the fault-free model: max |difference|, 0 expected when no worker is killed (a
restarted worker joins as a new member, so the steps its lease was running out in had a
smaller global batch).

Failures are paced by what happened: a failure ends --down s after it was done, and the next one
comes no sooner than --every minus --down after that end returned (a restart returns once the role
is healthy), so a slow restart stretches the gaps rather than piling failures up. The MTBF, downtime
and healthy time are reported as asked and as realised, and step efficiency (steps per second under
chaos over steps per second without) beside torchft's model, 1 - step / MTBF, with the realised MTBF:
over the chaos window (from the first failure to the last one's end) and over the whole run.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402


def scenario_text(failures: int, every: float, down: float, start: float, seed: int, targets: list[str],
                  kinds: tuple[str, ...] = ("kill",)) -> str:
    quoted = ", ".join(f'"{t}"' for t in targets)
    return (f'name = "chaos: {failures} failures, one every {every:g} s, seed {seed}"\n[chaos]\n'
            f"every_s = {every}\nfailures = {failures}\ndown_s = {down}\nstart_s = {start}\nseed = {seed}\n"
            f"targets = [{quoted}]\nkinds = [{', '.join(repr(k).replace(chr(39), chr(34)) for k in kinds)}]\n")


def chaos_run(args, out: Path) -> dict:
    """Both runs; the comparison as a dict."""
    from shardps.client.run import RunConfig, run
    from shardps.chaos.scenario import CHAOS_KINDS
    from shardps.client.sdk import load_model_file

    # partitions cut network-namespace hosts (root): both runs get them, so the fault-free one is a fair peer
    common = dict(workload=args.workload, steps=args.steps, servers=args.servers, workers=args.workers, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, lease_seconds=args.lease, eval_every=10 ** 9,
                  replicas=args.replicas, hosts="partition" in args.kinds)
    clean = run(RunConfig(out=str(out / "clean"), **common))
    scenario = out / "chaos.toml"
    scenario.write_text(scenario_text(args.failures, args.every, args.down, args.start, args.seed, args.targets,
                                      tuple(args.kinds)))
    faulty = run(RunConfig(out=str(out / "chaos"), scenario=str(scenario), **common))

    a, b = load_model_file(clean["model_file"]), load_model_file(faulty["model_file"])
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    report = _read_report(out / "chaos")
    # a failure is a kill, a pause or a partition; survived when its end (restart, resume, heal) worked and the run
    # ended
    failures = [e for e in report["timeline"] if e["action"] in CHAOS_KINDS]
    ends = [e for e in report["timeline"] if e["action"] in CHAOS_KINDS.values()]
    pacing = report["pacing"]  # (chaos.report.chaos_pacing, written with the report)
    step_s = clean["train_s"] / args.steps  # a fault-free step, start-up left out
    # torchft's model, efficiency ~ 1 - (time a failure costs) / MTBF, with a failure costing one step and the
    # MTBF that happened (a slow restart stretches the gaps: the runner paces failures by their ends)
    mtbf = pacing["mtbf_s"] or args.every
    window = pacing["window_s"]
    return {
        "scenario": scenario.read_text(),
        "failures_injected": len(failures),
        "failures_survived": sum(e["ok"] for e in ends) if faulty["steps"] == args.steps else 0,
        "kills": sum(e["action"] == "kill" for e in failures),
        "killed": [e["target"] for e in failures],  # the roles hit, in order (killed, paused or cut off)
        "steps": faulty["steps"],
        "steps_rolled_back": report["counters"].get("steps_rolled_back", 0),
        "rollbacks": report["counters"].get("rollbacks", 0),
        "failovers": report["counters"].get("failovers", 0),
        "retries": report["counters"].get("retries", 0),
        "pushes_applied_twice": sum(v.startswith("[applied once]") for v in faulty["history"]["violations"]),
        "history": faulty["history"],  # the checker's verdict over every role's recorded events
        "wall_s": {"clean": clean["wall_s"], "chaos": faulty["wall_s"]},
        "wall_ratio": faulty["wall_s"] / clean["wall_s"],
        # the failures as asked and as they happened (chaos.report.chaos_pacing): the runner waits for a
        # failure's end before the next failure's healthy stretch starts, so a slow restart lengthens the MTBF
        "mtbf_s": {"asked": args.every, "realised": pacing["mtbf_s"]},
        "downtime_s": {"asked": args.down, "realised": pacing["downtime_s"], "max": pacing["downtime_max_s"]},
        "healthy_s": {"asked": args.every - args.down, "realised": pacing["healthy_s"], "min": pacing["healthy_min_s"]},
        "chaos_window_s": window,  # from the first failure to the last one's end
        # step efficiency: steps per second under chaos over steps per second without. Over the chaos window
        # (steps the job advanced while failures came, by the timeline) against torchft's model with the
        # realised MTBF; and over the whole run (wall time, start-up included) against the same model
        # summed over the failures that happened (each costing one step)
        "step_efficiency_in_window": (pacing["steps_in_window"] / window) * step_s if window else None,
        "efficiency_model_in_window": 1 - step_s / mtbf,
        "step_efficiency": clean["wall_s"] / faulty["wall_s"],
        "efficiency_model": clean["wall_s"] / (clean["wall_s"] + len(failures) * step_s),
        "efficiency_model_as_asked": 1 - step_s / args.every,
        "step_s": step_s,
        "lost_s_per_failure": (faulty["wall_s"] - clean["wall_s"]) / max(1, len(failures)),
        "held_out": {"clean": clean["held_out"], "chaos": faulty["held_out"]},
        "max_abs_param_diff": diff,
        "report": faulty["report"]["path"],
    }


def _read_report(run_dir: Path) -> dict:
    import json

    return json.loads((run_dir / "report.json").read_text())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--failures", type=int, default=6)
    ap.add_argument("--every", type=float, default=6.0, help="seconds between failures")
    ap.add_argument("--down", type=float, default=1.0, help="seconds a killed role stays down")
    ap.add_argument("--start", type=float, default=3.0, help="seconds into training of the first failure")
    ap.add_argument("--targets", nargs="+", default=["servers", "coordinator"],
                    help="servers, workers, coordinator or role names (workers: see the note in bench/RESULTS.md)")
    ap.add_argument("--kinds", nargs="+", default=["kill"], choices=["kill", "pause", "partition"],
                    help="what a failure is: kill + restart, pause (SIGSTOP) + resume, partition + heal of the "
                         "role's network-namespace host (root; every role on a host of its own); drawn per failure")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workload", default="digits")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--servers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=20)
    ap.add_argument("--lease", type=float, default=5.0, help="worker lease (s): how long a killed worker is waited for")
    ap.add_argument("--replicas", type=int, default=1,
                    help="copies of each shard (2+: a killed server fails over to a copy, nothing rolls back)")
    ap.add_argument("--dir", help="keep both run directories here (default: a temporary directory)")
    ap.add_argument("--out", help="also write the JSON result here")
    args = ap.parse_args(argv)
    if args.dir:
        result = chaos_run(args, Path(args.dir))
    else:
        with tempfile.TemporaryDirectory(prefix="shardps-chaos-") as tmp:
            result = chaos_run(args, Path(tmp))
    emit("chaos", {"config": vars(args), **result}, args.out)
    return result


if __name__ == "__main__":
    main()
