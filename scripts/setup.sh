# shellcheck shell=bash
# Sourced by scripts/demo, scripts/test and scripts/stack: installs what is missing, safely rerun.
# Debian packages (as root), then the virtualenv .venv with Capsule and its Python deps.

CAPSULE_ROOT=$(cd -P "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
APT_PACKAGES=(openssl mariadb-server mariadb-client ejabberd erlang-p1-mysql prosody
              lua-dbi-mysql lua-unbound python3 python3-venv shellcheck chromium)

capsule_setup() {
    local missing=()
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        if [ "$(id -u)" -ne 0 ]; then
            echo "setup: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
            return 1
        fi
        echo "setup: installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null
    fi
    local venv="$CAPSULE_ROOT/.venv"
    local stamp="$venv/.capsule-deps"
    local want
    want=$(sha256sum "$CAPSULE_ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ ! -x "$venv/bin/python" ]; then
        echo "setup: creating $venv"
        python3 -m venv "$venv"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "setup: installing Python dependencies into $venv"
        local log="$venv/pip-install.log"
        if ! { "$venv/bin/python" -m pip install --upgrade pip &&
               "$venv/bin/python" -m pip install -e "${CAPSULE_ROOT}[test,dev]"; } >"$log" 2>&1; then
            tail -n 30 "$log" >&2
            echo "setup: pip install failed (full log: $log)" >&2
            return 1
        fi
        echo "$want" >"$stamp"
    fi
    # slixmpp's examples (echo_client.py, which the tests run with Capsule added) ship only in
    # its sdist: fetch the one of the installed version, once
    local version
    version=$("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("slixmpp"))')
    if [ ! -f "$venv/sdist/slixmpp-$version.tar.gz" ]; then
        echo "setup: fetching the slixmpp $version sdist (its examples) into $venv/sdist"
        "$venv/bin/python" -m pip download "slixmpp==$version" --no-binary :all: --no-deps \
            -d "$venv/sdist" >>"$venv/pip-install.log" 2>&1 ||
            echo "setup: could not download the slixmpp sdist (see $venv/pip-install.log)" >&2
    fi
}
