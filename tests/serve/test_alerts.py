"""docs/alerts.yml: valid rules that name only metrics a server exports."""

import re
from pathlib import Path

import yaml

from ldmkit.serve.metrics import Metrics

RULES = Path(__file__).resolve().parents[2] / "docs" / "alerts.yml"


def exported_names() -> set[str]:
    m = Metrics()
    m.request("/v1/images/generations", "POST", 200, 0.1)
    for counter in (m.policy.labels("r"), m.safety.labels("m", "blur"), m.similarity.labels("m", "flag")):
        counter.inc()
    m.images.labels("m").inc()
    m.drift.labels("m").set(1.0)
    text = m.render()[0].decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_alert_rules_are_well_formed_and_name_exported_metrics():
    doc = yaml.safe_load(RULES.read_text())
    rules = [r for g in doc["groups"] for r in g["rules"]]
    assert len(rules) >= 6
    names = exported_names()
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in ("page", "warn")
        assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
        used = set(re.findall(r"\b(ldmkit_[a-z_]+)", rule["expr"]))
        assert used <= names, (rule["alert"], used - names)
    # every governance metric is watched by some rule
    watched = {m for r in rules for m in re.findall(r"\b(ldmkit_[a-z_]+)", r["expr"])}
    for metric in (
        "ldmkit_safety_flagged_total",
        "ldmkit_similarity_flagged_total",
        "ldmkit_policy_refusals_total",
        "ldmkit_output_frechet_distance",
    ):
        assert metric in watched
