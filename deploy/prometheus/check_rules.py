#!/usr/bin/env python3
"""What promtool cannot see in the alert rules (run by scripts/check-deploy after `promtool check rules`
and `promtool test rules`).

Fails (exit 1) when:
- k8s/optional/prometheus-rule.yaml is not a monitoring.coreos.com/v1 PrometheusRule whose groups are
  exactly those of deploy/prometheus/alerts.yaml (`--write` regenerates it from alerts.yaml);
- an alert has no `severity` of critical/warning, or lacks a summary, description or runbook_url;
- a runbook_url is not `docs/METRICS.md#<anchor>` with a heading of docs/METRICS.md making that anchor;
- an expression reads a metric that neither binary registers (nor a recording rule of the file records);
- alerts_test.yaml lacks, for an alert, a case where it fires and a case where it does not.

`--self-test` feeds broken copies to the checks and fails unless each is reported.
"""

import pathlib
import re
import sys

import yaml

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from self_test import run as self_test_run  # noqa: E402 (deploy/ is not a package)

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
RULES = ROOT / "deploy/prometheus/alerts.yaml"
TESTS = ROOT / "deploy/prometheus/alerts_test.yaml"
OPERATOR_RULE = ROOT / "k8s/optional/prometheus-rule.yaml"
RUNBOOKS = ROOT / "docs/METRICS.md"
# The Rust files that register metrics (`r.counter("name", ...)`, `r.gauge_vec(...)`, ...).
METRIC_SOURCES = ["api/src/metrics.rs", "worker/src/metrics.rs"]
# The process collector's metrics (common::metrics::registry) and Prometheus' own per-target series.
BUILTIN_METRICS = {"process_cpu_seconds_total", "process_resident_memory_bytes", "process_virtual_memory_bytes",
                   "process_open_fds", "process_max_fds", "process_start_time_seconds", "process_threads", "up"}
SEVERITIES = {"critical", "warning"}
# PromQL words that look like metric names in an expression.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
    "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "rate", "irate", "increase", "delta", "idelta", "deriv", "changes", "resets", "abs", "round",
    "absent", "absent_over_time", "clamp_min", "clamp_max", "histogram_quantile", "predict_linear", "vector",
    "scalar", "time", "timestamp", "label_replace", "min_over_time", "max_over_time", "avg_over_time",
    "sum_over_time", "count_over_time", "last_over_time", "quantile_over_time", "present_over_time",
}

ANNOTATIONS = ("summary", "description", "runbook_url")

PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yaml by `deploy/prometheus/check_rules.py --write`: edit that
# file, then regenerate (scripts/check-deploy fails while the two differ).
#
# Optional (needs the Prometheus Operator's CRDs, hence not in kustomization.yaml):
#   kubectl apply -f k8s/optional/prometheus-rule.yaml
# The Operator loads it when the Prometheus resource's ruleSelector matches its labels (kube-prometheus-stack
# selects `release: <its release name>` by default: set that label to yours).
"""


def operator_rule(rules):
    """The PrometheusRule that carries these rule groups."""
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "highload-microservice",
            "namespace": "highload-microservice",
            "labels": {"app.kubernetes.io/part-of": "highload-microservice", "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": rules["groups"]},
    }


def render_operator_rule(rules):
    class Dumper(yaml.SafeDumper):
        pass

    # Multi-line expressions stay readable block scalars, as in alerts.yaml.
    Dumper.add_representer(str, lambda d, s: d.represent_scalar(
        "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))
    return PROMETHEUS_RULE_HEADER + yaml.dump(operator_rule(rules), Dumper=Dumper, sort_keys=False, width=120)


def registered_metrics():
    names = set(BUILTIN_METRICS)
    for source in METRIC_SOURCES:
        names |= set(re.findall(r'\br\s*\.\w+\(\s*"(\w+)"', (ROOT / source).read_text()))
    return names


def metrics_read(expr):
    """The metric names an expression selects (label matchers, strings, durations and grouping
    clauses removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    tokens = re.findall(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr)
    return {t for t in tokens if t not in PROMQL_WORDS}


def anchors(markdown):
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE):
        found.add(re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-"))
    return found


def check(model):
    problems = []
    rules, tests, operator, runbooks = model["rules"], model["tests"], model["operator"], model["runbooks"]

    expected = operator_rule(rules)
    for key in ("apiVersion", "kind"):
        if operator.get(key) != expected[key]:
            problems.append(f"{OPERATOR_RULE.name}: {key} is {operator.get(key)!r}, not {expected[key]!r}")
    if operator.get("spec", {}).get("groups") != rules["groups"]:
        problems.append(f"{OPERATOR_RULE.name} differs from alerts.yaml: run deploy/prometheus/check_rules.py --write")

    known = registered_metrics() | {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    alerts = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            name = rule.get("alert") or rule.get("record")
            for metric in sorted(metrics_read(rule["expr"])):
                base = re.sub(r"_(bucket|count|sum)$", "", metric)
                if metric not in known and base not in known:
                    problems.append(f"{name}: reads {metric}, which no binary exports")
            if "alert" not in rule:
                continue
            alerts.append(name)
            if rule.get("labels", {}).get("severity") not in SEVERITIES:
                problems.append(f"{name}: severity is not one of {sorted(SEVERITIES)}")
            for annotation in ANNOTATIONS:
                if not rule.get("annotations", {}).get(annotation):
                    problems.append(f"{name}: no {annotation} annotation")
            url = rule.get("annotations", {}).get("runbook_url", "")
            page, _, anchor = url.partition("#")
            if page != "docs/METRICS.md" or anchor not in anchors(runbooks):
                problems.append(f"{name}: runbook_url {url!r} is not a heading of docs/METRICS.md")

    fires, quiet = set(), set()
    for case in tests["tests"]:
        for test in case.get("alert_rule_test", []):
            (fires if test.get("exp_alerts") else quiet).add(test["alertname"])
    for name in alerts:
        if name not in fires:
            problems.append(f"{name}: alerts_test.yaml has no case where it fires")
        if name not in quiet:
            problems.append(f"{name}: alerts_test.yaml has no case where it stays quiet")
    return problems


def load_model():
    return {
        "rules": yaml.safe_load(RULES.read_text()),
        "tests": yaml.safe_load(TESTS.read_text()),
        "operator": yaml.safe_load(OPERATOR_RULE.read_text()),
        "runbooks": RUNBOOKS.read_text(),
    }


def self_test():
    """Each broken copy must be reported, and the intact one must not be."""

    def alert(m, name):
        return next(r for g in m["rules"]["groups"] for r in g["rules"] if r.get("alert") == name)

    def drifted(m):
        alert(m, "OutboxStalled")["expr"] = alert(m, "OutboxStalled")["expr"].replace("[10m]", "[30m]")

    def wrong_kind(m):
        m["operator"]["apiVersion"] = "monitoring.coreos.com/v1alpha1"

    def no_severity(m):
        del alert(m, "RedisDegraded")["labels"]["severity"]

    def no_summary(m):
        del alert(m, "DbPoolTimeouts")["annotations"]["summary"]

    def dangling_runbook(m):
        m["runbooks"] = m["runbooks"].replace("### WorkerDeadLettering", "### Dead letters")

    def unknown_metric(m):
        rule = alert(m, "WorkerConsumerLagHigh")
        rule["expr"] = rule["expr"].replace("kafka_consumer_lag", "kafka_consumergroup_lag")

    def untested(m):
        for case in m["tests"]["tests"]:
            case["alert_rule_test"] = [t for t in case.get("alert_rule_test", [])
                                       if t["alertname"] != "OutboxNoPublisher" or t.get("exp_alerts")]

    cases = [
        (drifted, "prometheus-rule.yaml differs from alerts.yaml"),
        (wrong_kind, "apiVersion is 'monitoring.coreos.com/v1alpha1'"),
        (no_severity, "RedisDegraded: severity is not one of"),
        (no_summary, "DbPoolTimeouts: no summary annotation"),
        (dangling_runbook, "WorkerDeadLettering: runbook_url 'docs/METRICS.md#workerdeadlettering' is not a heading"),
        (unknown_metric, "WorkerConsumerLagHigh: reads kafka_consumergroup_lag, which no binary exports"),
        (untested, "OutboxNoPublisher: alerts_test.yaml has no case where it stays quiet"),
    ]
    return self_test_run(load_model(), check, cases, "alert rules")


def main(argv):
    if argv[1:2] == ["--self-test"]:
        return self_test()
    if argv[1:2] == ["--write"]:
        OPERATOR_RULE.write_text(render_operator_rule(yaml.safe_load(RULES.read_text())))
        print(f"wrote {OPERATOR_RULE.relative_to(ROOT)}")
        return 0
    model = load_model()
    problems = check(model)
    for problem in problems:
        print(f"FAIL {problem}")
    alerts = sum(1 for g in model["rules"]["groups"] for r in g["rules"] if "alert" in r)
    print(f"alert rules: {len(problems)} problem(s) in {alerts} alerts")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
