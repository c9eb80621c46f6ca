"""The alarms and the dashboard in template.yaml watch exactly the metrics and dimensions the
code emits: a dimension that differs by one name would leave an alarm silent forever."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest

from handler import app
from handler.queue.store import QueueStore

from .conftest import FakeLambdaContext, emf_documents

cfn_yaml = pytest.importorskip("cfnlint.decode.cfn_yaml", reason="cfn-lint (the dev extra)")

TEMPLATE = Path(__file__).resolve().parents[2] / "template.yaml"
NAMESPACE = "QueueWorker"

Emitted = set[tuple[str, frozenset[tuple[str, str]]]]


@pytest.fixture
def emitted(
    lambda_env: dict[str, str], queue: QueueStore, capsys: pytest.CaptureFixture[str]
) -> Emitted:
    """(metric, dimensions) of every EMF metric one realistic batch prints."""
    tenant = uuid.uuid4()
    queue.enqueue(tenant, "ingest_slack", {})
    queue.enqueue(tenant, "process_embeddings", {"simulate": {"status": 500}})
    queue.enqueue(tenant, "generate_digest", {"simulate": {"status": 422}})
    app.lambda_handler({"scheduled_time": "2026-11-29T12:00:00Z"}, FakeLambdaContext())
    found: Emitted = set()
    for document in emf_documents(capsys.readouterr().out):
        for directive in document["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == NAMESPACE
            for dimension_names in directive["Dimensions"]:
                dimensions = frozenset((name, str(document[name])) for name in dimension_names)
                for metric in directive["Metrics"]:
                    found.add((metric["Name"], dimensions))
    return found


def template() -> dict[str, Any]:
    loaded: dict[str, Any] = cfn_yaml.load(str(TEMPLATE))
    return loaded


def alarms_on_our_metrics() -> list[tuple[str, str, frozenset[tuple[str, str]]]]:
    alarms = []
    for name, resource in template()["Resources"].items():
        props = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudWatch::Alarm" and props.get("Namespace") == NAMESPACE:
            dimensions = frozenset((d["Name"], d["Value"]) for d in props.get("Dimensions", []))
            alarms.append((name, props["MetricName"], dimensions))
    return alarms


def dashboard_body() -> dict[str, Any]:
    [dashboard] = [
        r for r in template()["Resources"].values() if r["Type"] == "AWS::CloudWatch::Dashboard"
    ]
    body = dashboard["Properties"]["DashboardBody"]
    text = body["Fn::Sub"] if isinstance(body, dict) else body
    if isinstance(text, list):
        text = text[0]
    # ${Resource} and ${AWS::X} are CloudFormation's; ${!X} stays as ${X} for CloudWatch.
    text = re.sub(r"\$\{(?!!)[^}]+\}", "SUBSTITUTED", text).replace("${!", "${")
    text = re.sub(r"(?<=[:\[,\s])SUBSTITUTED(?=[\s,\]}])", "0", text)  # an unquoted number
    return json.loads(text)


def test_there_are_alarms_on_the_queue_metrics() -> None:
    names = {metric for _, metric, _ in alarms_on_our_metrics()}
    assert {"JobsDeadLettered", "OldestJobAgeSeconds"} <= names


def test_every_alarm_watches_a_metric_with_the_dimensions_the_code_emits(emitted: Emitted) -> None:
    for alarm, metric, dimensions in alarms_on_our_metrics():
        assert (metric, dimensions) in emitted, (
            f"{alarm} watches {metric} {sorted(dimensions)}, never emitted"
        )


def test_every_dashboard_metric_is_one_the_code_emits(emitted: Emitted) -> None:
    checked = 0
    emitted_dimension_names = {(metric, frozenset(k for k, _ in dims)) for metric, dims in emitted}
    for widget in dashboard_body()["widgets"]:
        for line in widget.get("properties", {}).get("metrics", []):
            if line and line[0] == NAMESPACE:
                metric, rest = line[1], [x for x in line[2:] if isinstance(x, str)]
                dimensions = frozenset(zip(rest[::2], rest[1::2], strict=True))
                assert (metric, dimensions) in emitted, (
                    f"dashboard shows {metric} {sorted(dimensions)}"
                )
                checked += 1
            for item in line:
                if isinstance(item, dict) and "SEARCH(" in item.get("expression", ""):
                    match = re.search(
                        r"\{QueueWorker,([^}]*)\} MetricName=\\?\"(\w+)", item["expression"]
                    )
                    assert match, item["expression"]
                    names = frozenset(match.group(1).split(","))
                    assert (match.group(2), names) in emitted_dimension_names, item["expression"]
                    checked += 1
    assert checked >= 10
