"""Packaging: the wheel installs one import package, ``fleet``, with the parts as its subpackages."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_has_fleet_as_its_only_top_level_package(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("fleet_telemetry-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"fleet"}
    for part in ("config", "store", "broker", "agent", "collector", "collector/alerts", "web"):
        assert f"fleet/{part}/__init__.py" in names
    assert "fleet/notify/kinds.py" in names
    assert "fleet/web/static/app.js" in names
    assert "fleet/web/templates/index.html" in names


def _imported_distributions(folders: list[str]) -> dict[str, set[str]]:
    """Third-party distribution -> the folders whose code imports it."""
    import ast
    import importlib.metadata

    modules = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in ("fleet", "tests", "bench"):
                        continue
                    for dist in modules.get(top, [top]):
                        found.setdefault(dist.lower().replace("_", "-"), set()).add(folder)
    return found


def _requirement_names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0].lower().replace("_", "-") for req in requirements}


def test_every_imported_distribution_is_declared() -> None:
    """The parts import only what pyproject's dependencies install; tests and benchmarks may also use extras."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _requirement_names(project["dependencies"])
    extras = set().union(*(_requirement_names(reqs) for reqs in project.get("optional-dependencies", {}).values()))
    parts = _imported_distributions(["fleet", "config", "store", "broker", "agent", "collector", "web"])
    missing = {dist: sorted(folders) for dist, folders in parts.items() if dist not in runtime | extras}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    others = _imported_distributions(["tests", "bench"])
    missing = {dist: sorted(folders) for dist, folders in others.items() if dist not in runtime | extras}
    assert not missing, f"imported by tests or benchmarks but not declared in pyproject.toml: {missing}"
