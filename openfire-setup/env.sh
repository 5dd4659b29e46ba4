# shellcheck shell=bash
# Sourced by the openfire-setup commands: a virtualenv with Capsule, without the test stack's
# packages (an Openfire host needs none of ejabberd, Prosody or Chromium).
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ ! -x "$root/.venv/bin/python" ]; then
    echo "openfire-setup: creating $root/.venv" >&2
    if ! python3 -m venv "$root/.venv" 2>/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
        python3 -m venv "$root/.venv"
    fi
    "$root/.venv/bin/python" -m pip install -q -e "$root" >&2
fi
CAPSULE_PYTHON="$root/.venv/bin/python"
export CAPSULE_PYTHON
