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
    for part in ("config", "broker", "agent", "collector", "web"):
        assert f"fleet/{part}/__init__.py" in names
    assert "fleet/collector/notify/channels.py" in names
    assert "fleet/web/static/app.js" in names
    assert "fleet/web/templates/index.html" in names
