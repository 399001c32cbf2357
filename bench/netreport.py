"""``bench/network.py``'s output: network.json, a markdown table (network.md) and a plot (network.png)."""
from __future__ import annotations

import json
from pathlib import Path

MB = 1e6


def write_report(result: dict, out: Path) -> None:
    (out / "network.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "network.md").write_text(markdown(result))
    try:
        plot(result, out / "network.png")
    except ImportError as e:  # matplotlib is optional for the numbers
        print(f"no plot ({e}): pip install matplotlib", flush=True)


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _busiest(links: dict) -> tuple[str, dict]:
    return max(links.items(), key=lambda kv: kv[1].get("utilisation") or 0.0, default=("-", {}))


def markdown(result: dict) -> str:
    cfg = result["config"]
    lines = [f"`{result['command']}`", "",
             (f"{cfg['workload']}, {cfg['workers']} workers x {cfg['servers']} servers, batch {cfg['batch']}/worker, "
             f"{cfg['optimizer']} lr {cfg['lr']}, up to {cfg['steps']} steps per contender; step time = the fastest worker's median "
             f"after {cfg['warmup']} warmup steps; MB/step = the link's rx/tx (kernel counters) over the contender's "
             f"steps; util = busier direction's bytes/s over the link's rate; to-target = rank 0's training time to "
             f"held-out loss <= {cfg['target']}."), ""]
    for p in result["profiles"]:
        slow = p["slow_last_worker_mbit"]
        rates = f"{p['rate_mbit']:g} Mbit/s" + (f" (the last worker's {slow:g})" if slow else "")
        lines += [(f"**{p['profile']}**: links {rates}, delay {p['delay_ms']:g} ms one way; "
                  f"measured TCP RTT worker-0 -> server-0 {_f(p['rtt_ms'])} ms (expected {p['expected_rtt_ms']:g} ms "
                  f"+ the base)"), "",
                  ("| contender | steps | step s | steps/s per worker | worker-0 MB/step rx/tx | server-0 MB/step rx/tx "
                  "| busiest link (util) | to target s | final loss | status |"),
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            w, s = r["links"].get("worker-0", {}), r["links"].get("server-0", {})
            host, link = _busiest(r["links"])
            util = f"{host} ({link['utilisation']:.0%})" if link.get("utilisation") is not None else "-"
            lines.append(
                f"| {r['contender']} | {r['steps']} | {_f(r['step_s'], 3)} "
                f"| {' / '.join(_f(v) for v in r.get('process_steps_per_s') or []) or '-'} "
                f"| {_mb(w, 'rx')}/{_mb(w, 'tx')} | {_mb(s, 'rx')}/{_mb(s, 'tx')} | {util} "
                f"| {_f(r['time_to_target_s'], 1) if r['time_to_target_s'] is not None else 'not reached'} "
                f"| {_f(r['final_loss'], 3)} | {r['status']} |")
        lines.append("")
    return "\n".join(lines)


def _mb(link: dict, direction: str) -> str:
    value = link.get(f"{direction}_per_step")
    return "-" if value is None else f"{value / MB:.2f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Only what ran to the end: failed and skipped contenders are in the table, with their status.
    profiles = [{**p, "rows": [r for r in p["rows"] if r["status"] == "ok"]} for p in result["profiles"]]
    profiles = [p for p in profiles if p["rows"]]
    if not profiles:
        return
    fig, axes = plt.subplots(1, 1 + len(profiles), figsize=(5 * (1 + len(profiles)), 4.5), squeeze=False)
    bars = axes[0][0]
    names = list(dict.fromkeys(r["contender"] for p in profiles for r in p["rows"]))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        xs, ys = [], []
        for i, p in enumerate(profiles):
            row = next((r for r in p["rows"] if r["contender"] == name), None)
            if row and row["step_s"]:
                xs.append(i + k * width)
                ys.append(row["step_s"])
        bars.bar(xs, ys, width, label=name, color=f"C{k}")
    bars.set_xticks([i + 0.4 - width / 2 for i in range(len(profiles))], [p["profile"] for p in profiles])
    bars.set(ylabel="step time (s), fastest worker's median", title="step time per profile")
    bars.legend(fontsize=8)
    target = result["config"]["target"]
    for ax, p in zip(axes[0][1:], profiles):
        for r in p["rows"]:
            if r["curve"]:
                ax.plot([t for t, _ in r["curve"]], [v for _, v in r["curve"]], "o-", ms=3, label=r["contender"],
                        color=f"C{names.index(r['contender'])}")
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target:g}")
        ax.set(xlabel="training time of rank 0 (s)", ylabel="held-out loss", title=p["profile"])
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['config']['workload']}: shardps vs DDP over shaped links")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
