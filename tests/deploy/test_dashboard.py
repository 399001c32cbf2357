"""The Grafana dashboard (deploy/grafana/shardps.json) asks only for series that shardps serves: every
metric name in its queries is one that runtime/metrics.py exposes, with the suffix its type gets."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "shardps.json"
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def metric_families() -> dict[str, str]:
    """Family name -> type, read from the calls that create them in runtime/metrics.py."""
    text = (ROOT / "runtime" / "metrics.py").read_text()
    families = {}
    for call, name in re.findall(r'(\w+)\(\s*"(shardps_[a-z0-9_]+)"', text):
        families[name] = ("histogram" if "Histogram" in call else "counter" if "counter" in call.lower()
                          else "gauge")
    return families


def exposed_series() -> set[str]:
    """The sample names Prometheus sees (a counter ``x`` is scraped as ``x_total``, a histogram as ``x_bucket``...)."""
    return {name + suffix for name, kind in metric_families().items() for suffix in SUFFIXES[kind]}


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p["targets"]]


def test_the_metric_list_is_read_from_runtime_metrics():
    families = metric_families()
    assert families["shardps_shard_pushes"] == "counter" and families["shardps_shard_staleness"] == "histogram"
    assert families["shardps_worker_step_seconds"] == "histogram" and families["shardps_shard_version"] == "gauge"
    assert len(families) >= 20


def test_every_metric_the_dashboard_queries_exists_in_runtime_metrics():
    exposed = exposed_series()
    for title, expr in queries():
        names = re.findall(r"\bshardps_[a-z0-9_]+", expr)
        assert names, f"{title}: {expr} asks for no shardps metric"
        missing = [n for n in names if n not in exposed]
        assert not missing, f"panel {title!r} queries {missing}, which runtime/metrics.py does not serve"


def test_the_dashboard_shows_what_an_operator_looks_for():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    assert {"Step time by phase (mean)", "Pushes by outcome", "Staleness of applied pushes", "Rollbacks",
            "Retries and timeouts"} <= titles
    grouped = " ".join(expr for _, expr in queries())
    assert "by (phase)" in grouped and "by (outcome)" in grouped
    assert dashboard["templating"]["list"][0]["type"] == "datasource"  # imports into any Grafana
