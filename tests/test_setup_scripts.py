"""The README's commands on a fresh Debian/Ubuntu machine: a clean clone, only the distribution's Python on PATH."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
DISTRO_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # a fresh machine's PATH: no pyenv, no venv, no ~/.local/bin
KEPT_ENV = {"HOME", "LANG", "LC_ALL", "TMPDIR", "http_proxy", "https_proxy", "no_proxy",
            "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"}


def readme_commands() -> list[str]:
    """The commands of the README's first code block, without their comments."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README.md has no ```sh block"
    return [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]


def distro_env(**extra: str) -> dict[str, str]:
    """The environment of a new user's shell: PATH holds only the distribution's directories.

    pip's own settings (PIP_*) stay, since they say where this machine's package registry is.
    """
    env = {k: v for k, v in os.environ.items() if k in KEPT_ENV or k.startswith("PIP_")}
    return {**env, "PATH": DISTRO_PATH, **extra}


def clean_clone(dest: Path) -> Path:
    """``git clone`` of this checkout, plus its uncommitted changes to tracked files (nothing untracked)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(ROOT), str(dest)], check=True, timeout=120)
    diff = subprocess.run(["git", "-C", str(ROOT), "diff", "--binary", "HEAD"], check=True,
                          capture_output=True, timeout=60).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply", "--binary", "--whitespace=nowarn", "-"], input=diff,
                       check=True, timeout=60)
    return dest


@pytest.fixture(scope="module")
def distro_python() -> Path:
    """The distribution's python3, which a PATH without pyenv or a venv resolves to."""
    found = shutil.which("python3", path=DISTRO_PATH)
    if found is None:
        pytest.skip(f"no python3 in {DISTRO_PATH}")
    probe = subprocess.run([found, "-c", "import sys; print(sys.prefix != sys.base_prefix)"],
                           capture_output=True, text=True, check=True, timeout=30)
    assert probe.stdout.strip() == "False", f"{found} is a virtual environment's Python"
    return Path(found)


def healthz(port: int) -> int | None:
    """The status of GET /healthz, or None while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as res:
            return res.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


def test_readme_names_the_commands_that_ci_runs() -> None:
    up, test, fast = readme_commands()[:3]
    assert shlex.split(up)[:3] == ["./scripts/fleet", "up", "--demo"]
    assert test == "./scripts/test"
    assert shlex.split(fast) == ["./scripts/test", "-m", "not slow"]
    ci = [shlex.split(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    # CI runs the README's test command exactly, after at most environment assignments (PYTEST_ADDOPTS=...).
    commands = [[word for word in words if not re.match(r"^[A-Z_]+=", word)] for words in ci]
    assert shlex.split(test) in commands
    assert commands.index(["./scripts/check"]) < commands.index(shlex.split(test))


def test_the_scripts_use_the_virtual_environment_they_run_in(tmp_path: Path) -> None:
    own = tmp_path / "own-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(own)], check=True, timeout=60)
    made = tmp_path / "would-be-made"
    pick = 'source scripts/venv.sh && fleet_python 2>/dev/null && echo "$FLEET_PY"'

    def picked(**env: str) -> str:
        done = subprocess.run(["bash", "-c", pick], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env=distro_env(FLEET_VENV=str(made), **env))
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    # An activated venv (its bin first on PATH) is used as it is: nothing else is made.
    assert picked(PATH=f"{own}/bin:{DISTRO_PATH}", VIRTUAL_ENV=str(own)) == str(own / "bin" / "python3")
    # PYTHON names an interpreter outright.
    assert picked(PYTHON=str(own / "bin" / "python")) == str(own / "bin" / "python")
    assert not made.exists()


def test_deploy_units_run_the_virtual_environments_fleet() -> None:
    doc = (ROOT / "docs" / "deployment.md").read_text()
    assert "python3 -m venv /opt/fleet" in doc
    for unit in sorted((ROOT / "deploy").glob("*.service")):
        (exec_start,) = [line for line in unit.read_text().splitlines() if line.startswith("ExecStart=")]
        assert exec_start.startswith("ExecStart=/opt/fleet/bin/fleet "), unit.name


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_up_command_on_the_distributions_python(tmp_path: Path, distro_python: Path) -> None:
    clone = clean_clone(tmp_path / "clone")
    up = shlex.split(readme_commands()[0])
    http_port, mqtt_port = free_port(), free_port()
    log_path = tmp_path / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([*up, "--data-dir", str(tmp_path / "data"), "--http-port", str(http_port),
                                 "--mqtt-port", str(mqtt_port)], cwd=clone, env=distro_env(),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        # The first run makes .venv and installs fleet's dependencies: minutes on a cold pip cache.
        wait_for(lambda: proc.poll() is not None or healthz(http_port) == 200, timeout=600, interval=0.5,
                 message="scripts/fleet up healthy")
        assert proc.poll() is None, log_path.read_text()
        assert healthz(http_port) == 200
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=60) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    out = log_path.read_text()
    venv = clone / ".venv"
    assert f"using {venv}/bin/python (Python" in out
    assert f"{venv}/bin/fleet {' '.join(up[1:])}" in out  # how to run it again
    assert f"source {venv}/bin/activate" in out
    assert "reader key:" in out
    home = re.search(r"^home = (.+)$", (venv / "pyvenv.cfg").read_text(), re.M)
    assert home, "no home in .venv/pyvenv.cfg"
    assert Path(home.group(1)).resolve() == distro_python.parent.resolve()  # made from the distribution's Python
    check_units_against(venv)


def check_units_against(venv: Path) -> None:
    """deploy/'s units, pointed at ``venv`` instead of /opt/fleet: systemd accepts them, fleet parses them."""
    for unit in sorted((ROOT / "deploy").glob("*.service")):
        text = unit.read_text().replace("/opt/fleet", str(venv))
        (exec_start,) = [line for line in text.splitlines() if line.startswith("ExecStart=")]
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        parsed = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60)
        assert parsed.returncode == 0, f"{unit.name}: {parsed.stderr}"
        if shutil.which("systemd-analyze"):
            copy = venv.parent / unit.name
            copy.write_text(text)
            verified = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True,
                                      timeout=60)
            assert verified.returncode == 0, f"{unit.name}: {verified.stderr}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_readme_test_command_on_the_distributions_python(tmp_path: Path, distro_python: Path) -> None:
    clone = clean_clone(tmp_path / "clone")
    test = shlex.split(readme_commands()[1])
    done = subprocess.run([*test, "--collect-only", "-q"], cwd=clone, env=distro_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"using {clone}/.venv/bin/python (Python" in done.stderr
    collected = re.search(r"^(\d+) tests collected", done.stdout, re.M)
    assert collected, done.stdout[-2000:]
    assert int(collected.group(1)) > 0
    assert (clone / ".venv" / "bin" / "pytest").exists()


@pytest.mark.slow
def test_python3_venv_comes_from_apt_when_ensurepip_is_missing(tmp_path: Path, distro_python: Path) -> None:
    # Removing python3-venv from this shared machine is not an option: stubs stand in for a Python without
    # ensurepip and for apt (recording what it was asked); the venv is then made by the real python3.
    stubs = tmp_path / "bin"
    stubs.mkdir()
    calls = tmp_path / "apt-calls"
    for name, body in {
        "python3": f'[ "$*" = "-c import ensurepip" ] && exit 1; exec {distro_python} "$@"',
        "apt-get": f'echo "$*" >> {calls}',
        "dpkg-query": 'echo not-installed',
    }.items():
        (stubs / name).write_text(f"#!/bin/bash\n{body}\n")
        (stubs / name).chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(["bash", "-c", "source scripts/venv.sh && fleet_python"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=distro_env(PATH=f"{stubs}:{DISTRO_PATH}", FLEET_VENV=str(venv)))
    assert done.returncode == 0, done.stderr
    minor = subprocess.run([distro_python, "-c", "import sys; print(sys.version_info[1])"], capture_output=True,
                           text=True, check=True, timeout=30).stdout.strip()
    assert calls.read_text().splitlines() == ["update -qq", f"install -y -qq python3-venv python3.{minor}-venv"]
    assert (venv / "bin" / "pip").exists()
    assert f"using {venv}/bin/python" in done.stderr
