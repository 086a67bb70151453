"""The Grafana dashboard and the Prometheus rules we ship are checked against what a hub really
exports: every PromQL expression parses, every metric it names is in a scrape of a hub that served
requests, every label it matches or groups by is one that metric has, and promtool checks the
rules and runs their unit tests (deploy/prometheus/alerts_test.yml)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from test_observability import Upstream, hub_config, known_sequence, scrape, upstream  # noqa: F401 (a fixture)

from batlehub.metrics import HubMetrics
from batlehub.testing.hub import HubFactory

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "batlehub.json"
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
ADDED_BY_PROMETHEUS = {"instance", "job", "__name__"}
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$registry": ".*"}


def dashboard_expressions() -> list[str]:
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(target["expr"] for target in panel.get("targets", []))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    out = []
    for expr in found:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
        out.append(expr)
    return out


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def selectors_and_groupings(expr: str) -> tuple[list[Any], set[str]]:
    """The vector selectors of `expr`, and every label name it groups or joins by."""
    selectors: list[Any] = []
    grouping: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append(node)
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            grouping.update(node.modifier.labels)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return selectors, grouping


def labels_of_exported() -> dict[str, set[str]]:
    """Series name -> its label names, from the metric definitions (a scrape shows only the
    series that were counted, and some, like policy decisions, need events a test cannot cause)."""
    names: dict[str, set[str]] = {}
    for collector in HubMetrics().registry._collector_to_names:
        kind, base, labels = collector._type, collector._name, set(collector._labelnames)
        if kind == "counter":
            names[f"{base}_total"] = labels
        elif kind == "histogram":
            names[f"{base}_bucket"] = labels | {"le"}
            names[f"{base}_count"] = names[f"{base}_sum"] = labels
        else:
            names[base] = labels
    return names


def test_the_chart_ships_the_same_dashboard_and_rules() -> None:
    assert (ROOT / "helm" / "batlehub" / "dashboards" / "batlehub.json").read_bytes() == DASHBOARD.read_bytes()
    assert (ROOT / "helm" / "batlehub" / "rules" / "alerts.yml").read_bytes() == RULES.read_bytes()


async def test_every_expression_uses_metrics_a_hub_exports(hub: HubFactory, upstream: Upstream) -> None:  # noqa: F811
    server = await hub(hub_config(upstream))
    await known_sequence(server)
    exported = (await scrape(server.url + "/metrics")).text
    defined = labels_of_exported()
    # The definitions are what /metrics shows: every one is in the scrape (HELP and TYPE at least,
    # before anything was counted), and the scrape shows nothing else of ours.
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name for f in text_string_to_metric_families(exported) if f.name.startswith("batlehub_")}
    assert families == {collector._name for collector in HubMetrics().registry._collector_to_names}
    recorded = {rule["record"]: set[str]() for rule in rules() if "record" in rule}
    known = {**defined, **recorded}

    expressions = dashboard_expressions() + [rule["expr"] for rule in rules()]
    assert len(expressions) > 30
    for expr in expressions:
        selectors, grouping = selectors_and_groupings(expr)
        assert selectors, expr
        available: set[str] = set(ADDED_BY_PROMETHEUS)
        for selector in selectors:
            assert selector.name in known, f"{selector.name} is not exported: {expr}"
            labels = known[selector.name] | ADDED_BY_PROMETHEUS
            for matcher in selector.matchers.matchers:
                assert matcher.name in labels, f"{selector.name} has no label {matcher.name}: {expr}"
            available |= labels
        assert grouping <= available, f"grouping by {grouping - available} that no series has: {expr}"


def promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(found).exists():
        pytest.fail("promtool not found: ./scripts/test installs it (from Debian's prometheus package) into .venv/bin")
    return found


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tested = subprocess.run(
        [promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True, text=True, cwd=RULE_TESTS.parent
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_says_what_it_is() -> None:
    alerts = [rule for rule in rules() if "alert" in rule]
    names = {rule["alert"] for rule in alerts}
    # The list of what pages someone.
    assert {"BatleHubUpstreamDown", "BatleHubStorageErrors", "BatleHubDatabaseErrors", "BatleHubHigh5xxRate"} <= names
    assert {"BatleHubLatencySLOFastBurn", "BatleHubLatencySLOSlowBurn"} <= names
    tested = RULE_TESTS.read_text()
    for rule in alerts:
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert f"alertname: {rule['alert']}" in tested, f"{rule['alert']} has no unit test"
