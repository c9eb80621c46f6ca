"""template.yaml, samconfig.toml and events/env.json as a specification of the deployment.

Offline: the template is parsed with cfn-lint's decoder (it understands !Ref, !Sub, ...) and
linted with cfn-lint's Python API, which runs the SAM transform locally.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

cfn_yaml = pytest.importorskip("cfnlint.decode.cfn_yaml", reason="cfn-lint (the dev extra)")
cfnlint_api = pytest.importorskip("cfnlint.api", reason="cfn-lint (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"
FUNCTION = "QueueWorkerFunction"

# Every variable the handler documents (the README's configuration table), plus fan-out and Powertools' own.
DOCUMENTED_VARIABLES = frozenset(
    {
        "DATABASE_URL",
        "DATABASE_SECRET_ARN",
        "SUPABASE_URL",
        "FUNCTIONS_BASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
        "MAX_JOBS_PER_TENANT",
        "MAX_JOBS_PER_RUN",
        "MAX_CONCURRENCY",
        "HTTP_TIMEOUT_SECONDS",
        "JOB_LEASE_SECONDS",
        "JOB_ROUTES",
        "IDEMPOTENCY_STORE",
        "IDEMPOTENCY_TABLE",
        "FAN_OUT_MAX",
        "RESERVED_CONCURRENCY",
        "COMPLETED_RETENTION",
        "DEAD_LETTER_RETENTION",
        "DATABASE_SSLROOTCERT",
        "DATABASE_POOL_MODE",
        "RUN_MODE",
        "LINGER",
        "MAX_JOBS_PER_INVOCATION",
    }
)
DOCUMENTED_PREFIXES = ("POWERTOOLS_",)

# What a deployment must be able to configure: a parameter reaches each of these.
DEPLOYED_VARIABLES = frozenset(
    {
        "DATABASE_URL",
        "DATABASE_SECRET_ARN",
        "SUPABASE_URL",
        "FUNCTIONS_BASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY_SECRET_ARN",
        "MAX_JOBS_PER_TENANT",
        "MAX_JOBS_PER_RUN",
        "MAX_CONCURRENCY",
        "HTTP_TIMEOUT_SECONDS",
        "JOB_ROUTES",
        "IDEMPOTENCY_STORE",
        "IDEMPOTENCY_TABLE",
        "FAN_OUT_MAX",
        "RESERVED_CONCURRENCY",
        "COMPLETED_RETENTION",
        "DEAD_LETTER_RETENTION",
        "DATABASE_SSLROOTCERT",
        "DATABASE_POOL_MODE",
        "RUN_MODE",
        "LINGER",
        "MAX_JOBS_PER_INVOCATION",
        "POWERTOOLS_SERVICE_NAME",
        "POWERTOOLS_METRICS_NAMESPACE",
        "POWERTOOLS_LOG_LEVEL",
    }
)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return cfn_yaml.load(str(TEMPLATE))


@pytest.fixture(scope="module")
def resources(template: dict[str, Any]) -> dict[str, Any]:
    return template["Resources"]


@pytest.fixture(scope="module")
def function(resources: dict[str, Any]) -> dict[str, Any]:
    return resources[FUNCTION]["Properties"]


@pytest.fixture(scope="module")
def environment(function: dict[str, Any]) -> dict[str, Any]:
    return function["Environment"]["Variables"]


def _of_type(resources: dict[str, Any], kind: str) -> dict[str, Any]:
    return {name: r for name, r in resources.items() if r["Type"] == kind}


def _is_no_value_if(value: Any, condition: str) -> bool:
    """`!If [condition, something, !Ref AWS::NoValue]`."""
    return (
        isinstance(value, dict)
        and list(value) == ["Fn::If"]
        and value["Fn::If"][0] == condition
        and value["Fn::If"][2] == {"Ref": "AWS::NoValue"}
    )


def test_cfn_lint_finds_nothing_to_report() -> None:
    # Given the template, when cfn-lint checks it (SAM transform included)
    matches = cfnlint_api.lint_file(TEMPLATE, config=cfnlint_api.ManualArgs(regions=["us-east-1"]))

    # Then it reports no error and no warning
    problems = [m for m in matches if m.rule.id[0] in "EW"]
    assert problems == [], "\n".join(str(m) for m in problems)


def test_the_function_runs_python_3_13_on_arm64_from_src(function: dict[str, Any]) -> None:
    assert function["Runtime"] == "python3.13"
    assert function["Architectures"] == ["arm64"]
    assert function["Handler"] == "handler.app.lambda_handler"
    assert function["CodeUri"] == "src/"
    assert (ROOT / "src" / "requirements.txt").is_file()


def test_the_function_traces_with_x_ray_and_logs_json_to_a_retained_group(
    function: dict[str, Any], resources: dict[str, Any]
) -> None:
    assert function["Tracing"] == "Active"
    logging = function["LoggingConfig"]
    assert logging["LogFormat"] == "JSON"
    log_group = resources[logging["LogGroup"]["Ref"]]
    assert log_group["Type"] == "AWS::Logs::LogGroup"
    assert log_group["Properties"]["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_lambda_never_retries_a_run_because_the_queue_is_the_retry_loop(
    function: dict[str, Any],
) -> None:
    assert function["EventInvokeConfig"]["MaximumRetryAttempts"] == 0
    assert function["EventInvokeConfig"]["MaximumEventAgeInSeconds"] == 60


def test_the_schedule_is_a_scheduler_v2_event_passing_its_scheduled_time(
    function: dict[str, Any],
) -> None:
    # Given the function's events
    schedules = [e for e in function["Events"].values() if e["Type"] == "ScheduleV2"]

    # Then one ScheduleV2 runs it, without retries, with the Scheduler's context attribute
    assert len(schedules) == 1
    schedule = schedules[0]["Properties"]
    assert schedule["ScheduleExpression"] == {"Ref": "ScheduleExpression"}
    assert schedule["State"] == {"Ref": "ScheduleState"}
    assert schedule["RetryPolicy"]["MaximumRetryAttempts"] == 0
    assert json.loads(schedule["Input"]) == {"scheduled_time": "<aws.scheduler.scheduled-time>"}


def test_schedule_parameters_default_to_every_minute_and_enabled(template: dict[str, Any]) -> None:
    parameters = template["Parameters"]
    assert parameters["ScheduleExpression"]["Default"] == "rate(1 minute)"
    assert set(parameters["ScheduleState"]["AllowedValues"]) == {"ENABLED", "DISABLED"}


def test_the_idempotency_table_exists_only_for_the_dynamodb_store_and_expires_records(
    template: dict[str, Any], resources: dict[str, Any], environment: dict[str, Any]
) -> None:
    # Given the DynamoDB tables of the template
    tables = _of_type(resources, "AWS::DynamoDB::Table")

    # Then the one table is conditional on the dynamodb store, keyed by id, with TTL on expiration
    assert list(tables) == ["IdempotencyTable"]
    table = tables["IdempotencyTable"]
    assert template["Conditions"][table["Condition"]] == {
        "Fn::Equals": [{"Ref": "IdempotencyStore"}, "dynamodb"]
    }
    properties = table["Properties"]
    assert properties["KeySchema"] == [{"AttributeName": "id", "KeyType": "HASH"}]
    assert properties["BillingMode"] == "PAY_PER_REQUEST"
    assert properties["TimeToLiveSpecification"] == {"AttributeName": "expiration", "Enabled": True}
    assert properties["SSESpecification"]["SSEEnabled"] is True
    assert _is_no_value_if(environment["IDEMPOTENCY_TABLE"], table["Condition"])


def test_every_environment_variable_is_one_the_handler_documents(
    environment: dict[str, Any],
) -> None:
    undocumented = {
        name
        for name in environment
        if name not in DOCUMENTED_VARIABLES and not name.startswith(DOCUMENTED_PREFIXES)
    }
    assert undocumented == set()


def test_every_setting_a_deployment_needs_reaches_the_environment(
    environment: dict[str, Any],
) -> None:
    assert DEPLOYED_VARIABLES - set(environment) == set()
    assert environment["POWERTOOLS_SERVICE_NAME"] == "queue-worker"
    assert environment["POWERTOOLS_METRICS_NAMESPACE"] == "QueueWorker"


def test_each_secret_pair_gives_the_function_one_variable_only(
    environment: dict[str, Any], template: dict[str, Any]
) -> None:
    # DATABASE_URL and DATABASE_SECRET_ARN are the two branches of one condition
    secret, url = (
        environment["DATABASE_SECRET_ARN"]["Fn::If"],
        environment["DATABASE_URL"]["Fn::If"],
    )
    assert secret[0] == url[0] == "HasDatabaseSecret"
    assert secret[1:] == [{"Ref": "DatabaseSecretArn"}, {"Ref": "AWS::NoValue"}]
    assert url[1:] == [{"Ref": "AWS::NoValue"}, {"Ref": "DatabaseUrl"}]
    # The plain service role key is never deployed: a Rule requires its secret
    key = environment["SUPABASE_SERVICE_ROLE_KEY"]["Fn::If"]
    assert key[0] == "HasServiceRoleKeySecret"
    assert key[1] == {"Ref": "AWS::NoValue"}
    assert "FunctionsAreConfigured" in template["Rules"]
    assert "DatabaseIsConfigured" in template["Rules"]


def test_secrets_are_readable_only_when_configured(function: dict[str, Any]) -> None:
    # Given the policy templates that grant secretsmanager:GetSecretValue
    grants = {
        condition: policy["AWSSecretsManagerGetSecretValuePolicy"]["SecretArn"]
        for condition, policy, otherwise in (
            p["Fn::If"] for p in function["Policies"] if "Fn::If" in p
        )
        if "AWSSecretsManagerGetSecretValuePolicy" in policy
        and otherwise == {"Ref": "AWS::NoValue"}
    }

    # Then each secret is granted under the condition that it is set, and nothing else is
    assert grants == {
        "HasDatabaseSecret": {"Ref": "DatabaseSecretArn"},
        "HasServiceRoleKeySecret": {"Ref": "ServiceRoleKeySecretArn"},
    }
    unconditional = [p for p in function["Policies"] if "Fn::If" not in p]
    assert "secretsmanager" not in json.dumps(unconditional).lower()


def test_fan_out_may_invoke_only_this_function_without_a_circular_reference(
    function: dict[str, Any],
) -> None:
    # Given the function's fixed name and its inline statements
    assert function["FunctionName"] == {"Fn::Sub": "${AWS::StackName}-worker"}
    statements = [s for p in function["Policies"] if "Statement" in p for s in p["Statement"]]

    # Then the only invoke grant names that function's ARN, built from the stack name
    invoke = [s for s in statements if s["Action"] == "lambda:InvokeFunction"]
    assert len(invoke) == 1
    assert [r["Fn::Sub"].split(":function:")[1] for r in invoke[0]["Resource"]] == [
        "${AWS::StackName}-worker",
        "${AWS::StackName}-worker:*",
    ]
    assert FUNCTION not in json.dumps(function["Policies"])


def test_the_function_joins_a_vpc_only_when_subnets_are_given(
    function: dict[str, Any], template: dict[str, Any]
) -> None:
    assert _is_no_value_if(function["VpcConfig"], "HasVpc")
    assert template["Parameters"]["VpcSubnetIds"]["Type"] == "CommaDelimitedList"
    assert template["Parameters"]["VpcSecurityGroupIds"]["Type"] == "CommaDelimitedList"


def test_every_alarm_notifies_the_alarm_topic_both_ways(resources: dict[str, Any]) -> None:
    alarms = _of_type(resources, "AWS::CloudWatch::Alarm")
    assert alarms
    for name, alarm in alarms.items():
        properties = alarm["Properties"]
        assert properties["AlarmActions"] == [{"Ref": "AlarmTopic"}], name
        assert properties["OKActions"] == [{"Ref": "AlarmTopic"}], name
    assert resources["AlarmTopic"]["Type"] == "AWS::SNS::Topic"
    assert resources["AlarmEmailSubscription"]["Condition"] == "HasAlarmEmail"


@pytest.mark.parametrize("metric", ["Errors", "Throttles", "AsyncEventsDropped"])
def test_lambda_failures_raise_an_alarm_at_the_first_occurrence(
    resources: dict[str, Any], metric: str
) -> None:
    alarms = [
        a["Properties"]
        for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["Namespace"] == "AWS/Lambda" and a["Properties"]["MetricName"] == metric
    ]
    assert len(alarms) == 1
    alarm = alarms[0]
    assert alarm["Dimensions"] == [{"Name": "FunctionName", "Value": {"Ref": FUNCTION}}]
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("GreaterThanThreshold", 0)


def test_queue_alarms_watch_the_metrics_powertools_emits(
    resources: dict[str, Any], environment: dict[str, Any]
) -> None:
    # Given the alarms on the worker's own metrics
    alarms = {
        a["Properties"]["MetricName"]: a["Properties"]
        for a in _of_type(resources, "AWS::CloudWatch::Alarm").values()
        if a["Properties"]["Namespace"] == environment["POWERTOOLS_METRICS_NAMESPACE"]
    }

    # Then they use the single `service` dimension Powertools adds, with the right statistic
    assert set(alarms) == {"JobsDeadLettered", "OldestJobAgeSeconds"}
    service = [{"Name": "service", "Value": environment["POWERTOOLS_SERVICE_NAME"]}]
    dead = alarms["JobsDeadLettered"]
    assert (dead["Dimensions"], dead["Statistic"], dead["Period"]) == (service, "Sum", 300)
    assert (dead["ComparisonOperator"], dead["Threshold"]) == ("GreaterThanThreshold", 0)
    age = alarms["OldestJobAgeSeconds"]
    assert (age["Dimensions"], age["Statistic"]) == (service, "Maximum")
    assert age["Threshold"] == {"Ref": "OldestJobAgeAlarmSeconds"}


def test_the_dashboard_body_is_valid_json_and_searches_dispatch_latency_by_function(
    resources: dict[str, Any],
) -> None:
    # Given the dashboard body with every ${...} substituted as CloudFormation would
    body = resources["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name.startswith("!"):  # ${!Literal} stays ${Literal}
            return "${" + name[1:] + "}"
        if name in {"OldestJobAgeAlarmSeconds"}:
            return "900"
        reference = name.split(".")[0]
        assert reference.startswith("AWS::") or reference in resources or name == "Stage", name
        return f"substituted-{name}"

    # When it is parsed
    dashboard = json.loads(re.sub(r"\$\{([^}]+)\}", substitute, body))

    # Then it is a dashboard, and latency comes from a SEARCH over the function dimension
    text = json.dumps(dashboard)
    for metric in (
        "JobsClaimed",
        "JobsCompleted",
        "JobsRetried",
        "JobsDeadLettered",
        "JobsReleased",
        "JobsRescued",
        "QueueDepth",
        "OldestJobAgeSeconds",
        "BatchDuration",
        "JobsPruned",
        "ScheduledJobsCreated",
        "ConcurrentExecutions",
    ):
        assert f'"{metric}"' in text, metric
    expressions = [
        m[0]["expression"]
        for w in dashboard["widgets"]
        for m in w["properties"].get("metrics", [])
        if isinstance(m[0], dict)
    ]
    assert any("{QueueWorker,function,service}" in e and "'p99'" in e for e in expressions)
    assert any("{QueueWorker,function,service}" in e and "'p50'" in e for e in expressions)


def test_outputs_name_what_an_operator_looks_for(template: dict[str, Any]) -> None:
    outputs = template["Outputs"]
    assert {
        "FunctionName",
        "FunctionArn",
        "ScheduleName",
        "IdempotencyTableName",
        "AlarmTopicArn",
        "DashboardName",
        "DashboardUrl",
        "LogGroupName",
    } <= set(outputs)
    assert outputs["IdempotencyTableName"]["Condition"] == "UseDynamoDbIdempotency"


def test_env_json_overrides_only_variables_of_functions_in_the_template(
    resources: dict[str, Any],
) -> None:
    # Given the file `sam local invoke --env-vars` reads
    env = json.loads((ROOT / "events" / "env.json").read_text())

    # Then each key is a function of the template, and each variable one it declares
    # (sam local ignores an override for a variable the template does not declare)
    assert env
    for logical_id, variables in env.items():
        assert resources.get(logical_id, {}).get("Type") == "AWS::Serverless::Function", logical_id
        declared = resources[logical_id]["Properties"]["Environment"]["Variables"]
        assert set(variables) - set(declared) == set(), logical_id


def test_samconfig_deploys_dev_by_default_and_prod_on_request() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    for env, stage in (("default", "dev"), ("prod", "prod")):
        deploy = config[env]["deploy"]["parameters"]
        assert f"Stage={stage}" in deploy["parameter_overrides"].split()
        assert deploy["confirm_changeset"] is True
        assert deploy["capabilities"] == "CAPABILITY_IAM"
        assert "region" not in deploy
    assert "ScheduleState=ENABLED" in config["prod"]["deploy"]["parameters"]["parameter_overrides"]
    assert config["default"]["build"]["parameters"] == {"cached": True, "parallel": True}
    assert config["default"]["validate"]["parameters"]["lint"] is True
