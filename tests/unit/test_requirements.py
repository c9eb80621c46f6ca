"""src/requirements.txt (what the Lambda package ships) against pyproject.toml's dependencies.

The package is installed with --no-deps, so the file must pin every package, each within the
range pyproject.toml declares; tests/e2e/test_lambda_runtime.py checks on the built package that
nothing a shipped package requires is missing.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
# What the Lambda runtime provides; never shipped.
RUNTIME_PROVIDED = frozenset({"boto3", "botocore", "s3transfer"})


def pinned() -> dict[str, Requirement]:
    found = {}
    for line in (ROOT / "src" / "requirements.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            requirement = Requirement(text)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(line) for line in project["dependencies"]]


def test_every_shipped_package_is_pinned_to_one_version() -> None:
    for name, requirement in pinned().items():
        [specifier] = requirement.specifier
        assert specifier.operator == "==", name
        assert not requirement.marker, name  # one platform: the Lambda's


def test_what_the_runtime_provides_is_not_shipped() -> None:
    assert not RUNTIME_PROVIDED & pinned().keys()


def test_each_declared_dependency_is_pinned_within_its_declared_range() -> None:
    pins = pinned()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        if name in RUNTIME_PROVIDED:
            continue
        assert name in pins, f"{name} is a dependency in pyproject.toml but not pinned"
        [version] = [spec.version for spec in pins[name].specifier]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} is outside pyproject.toml's {requirement.specifier}"
        )
        assert requirement.extras <= pins[name].extras, name


def test_the_runtime_dependencies_are_the_designs_four_packages_and_two_small_helpers() -> None:
    # boto3, aws-lambda-powertools, httpx and pg8000 themselves (not forks: no httpx2), cronsim
    # and tzdata; nothing else in the Lambda
    assert {canonicalize_name(r.name) for r in declared()} == {
        "boto3",
        "aws-lambda-powertools",
        "httpx",
        "pg8000",
        "cronsim",
        "tzdata",
    }
    assert "httpx2" not in pinned()


def test_no_shipped_module_speaks_http_itself() -> None:
    # The HTTP/1.1 of the calls is httpx's (httpcore and h11 under it); only the local stand-in
    # functions, which are not shipped, use h11 directly
    handler = ROOT / "src" / "handler"
    assert not (handler / "dispatch" / "http_transport.py").exists()
    for module in handler.rglob("*.py"):
        if module.is_relative_to(handler / "local"):
            continue
        text = module.read_text()
        assert "import h11" not in text, module
        assert "from h11" not in text, module
