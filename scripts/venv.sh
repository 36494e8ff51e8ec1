# shellcheck shell=bash
# Sourced by scripts/fleet, scripts/test and scripts/check: the Python they install fleet into and run it with.
#
# fleet_python sets FLEET_PY to, in this order:
#   1. $PYTHON, if set: an interpreter you manage yourself;
#   2. the python3 on PATH, if it runs inside a virtual environment (an activated venv or virtualenv, a conda env):
#      nobody already working in one is pushed into another;
#   3. otherwise the Python of a virtual environment in the checkout, .venv ($FLEET_VENV to put it elsewhere),
#      made on first use with the python3 on PATH. Debian's and Ubuntu's Pythons refuse `pip install` outside a
#      virtual environment (PEP 668); their venv module needs ensurepip, which is in the python3-venv package,
#      installed here with apt-get when it is missing.
# fleet_install EXTRAS installs the checkout (editable, with those extras) into FLEET_PY, unless it already is.
# fleet_apt_install PACKAGE... installs the Debian packages that are not installed yet.

FLEET_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FLEET_VENV=${FLEET_VENV:-$FLEET_ROOT/.venv}
FLEET_PY=""
FLEET_PY_OWN=""  # "yes" when FLEET_PY belongs to the virtual environment these scripts made

fleet_say() { echo "fleet: $*" >&2; }

# The python3 on PATH if it runs inside a virtual environment or a conda env, else nothing.
fleet_env_python() {
  command -v python3 >/dev/null 2>&1 || return 0
  python3 - <<'EOF'
import os
import sys

conda = os.environ.get("CONDA_PREFIX")
in_conda = bool(conda) and os.path.realpath(sys.prefix) == os.path.realpath(conda)
if sys.prefix != sys.base_prefix or in_conda:
    print(sys.executable)
EOF
}

# Debian packages among the arguments that are not installed (nothing without dpkg).
fleet_apt_missing() {
  command -v dpkg-query >/dev/null 2>&1 || return 0
  local pkg
  for pkg in "$@"; do
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null)" = installed ] || echo "$pkg"
  done
}

fleet_apt_install() {
  local missing
  mapfile -t missing < <(fleet_apt_missing "$@")
  [ ${#missing[@]} -gt 0 ] || return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    fleet_say "needs ${missing[*]}, and there is no apt-get here: install them with your package manager"
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
      fleet_say "needs ${missing[*]}: as root, run apt-get install ${missing[*]}"
      return 1
    fi
    sudo=(sudo)
  fi
  fleet_say "installing Debian packages: ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

fleet_make_venv() {
  if [ -x "$FLEET_VENV/bin/python" ] && "$FLEET_VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
    return 0
  fi
  if ! command -v python3 >/dev/null 2>&1; then
    fleet_say "no python3 on PATH: install it (apt-get install python3) and run this again"
    return 1
  fi
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    local minor
    minor=$(python3 -c 'import sys; print(sys.version_info[1])')
    fleet_apt_install python3-venv "python3.$minor-venv"
  fi
  local clear=()
  [ -f "$FLEET_VENV/pyvenv.cfg" ] && clear=(--clear)  # a broken one, e.g. its base Python is gone
  fleet_say "creating a virtual environment in $FLEET_VENV"
  python3 -m venv "${clear[@]}" "$FLEET_VENV"
}

fleet_python() {
  FLEET_PY=${PYTHON:-$(fleet_env_python)}
  if [ -z "$FLEET_PY" ]; then
    fleet_make_venv
    FLEET_PY=$FLEET_VENV/bin/python
    FLEET_PY_OWN=yes
  fi
  fleet_say "using $FLEET_PY ($("$FLEET_PY" -c 'import platform; print("Python", platform.python_version())'))"
}

# Where FLEET_PY's fleet-telemetry was installed from (its PEP 610 direct_url.json), if it is installed.
fleet_installed_from() {
  "$FLEET_PY" -I - <<'EOF' 2>/dev/null || true
import json
from importlib import metadata

print(json.loads(metadata.distribution("fleet-telemetry").read_text("direct_url.json") or "{}").get("url", ""))
EOF
}

fleet_install() {
  local extras=$1 spec=$FLEET_ROOT prefix stamp key
  [ -z "$extras" ] || spec="$FLEET_ROOT[$extras]"
  prefix=$("$FLEET_PY" -c 'import sys; print(sys.prefix)')
  stamp="$prefix/.fleet-install-${extras:-base}"
  key="$FLEET_ROOT $(sha256sum "$FLEET_ROOT/pyproject.toml" | cut -d' ' -f1)"
  # Installed from this checkout, with these extras, since pyproject.toml last changed: nothing to do.
  if [ "$(cat "$stamp" 2>/dev/null)" = "$key" ] && [ "$(fleet_installed_from)" = "file://$FLEET_ROOT" ]; then
    return 0
  fi
  fleet_say "installing $spec"
  "$FLEET_PY" -m pip install -q --disable-pip-version-check -e "$spec"
  echo "$key" >"$stamp"
}

# How to run fleet again without these scripts (only for the virtual environment they made); args: a fleet command.
fleet_reuse_hint() {
  [ -n "$FLEET_PY_OWN" ] || return 0
  fleet_say "installed in $FLEET_VENV; next time, run $FLEET_VENV/bin/fleet $*"
  fleet_say "(or \`source $FLEET_VENV/bin/activate\` once, then any fleet command)"
}

