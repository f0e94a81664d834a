# Sourced by .ci/run and .ci/demo: the project's own virtual environment in .venv, with the project
# installed into it (editable). A stock Debian or Ubuntu python3 refuses `pip install` outside one
# (PEP 668), and ships venv support as a package of its own (python3-venv), installed here when missing.
# Sets PY to the environment's interpreter. Usage: project_venv [EXTRAS], e.g. project_venv test.
project_venv() {
    local extras=${1:-}
    if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -c 'import sys' 2>/dev/null; then
        rm -rf .venv
        if ! python3 -m venv .venv >/dev/null 2>&1; then
            rm -rf .venv
            if [[ $(id -u) != 0 ]]; then
                echo "python3 cannot create a virtual environment: install python3-venv (as root: apt-get install python3-venv)" >&2
                return 1
            fi
            echo "$0: apt-get install python3-venv" >&2
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
            python3 -m venv .venv
        fi
    fi
    PY=.venv/bin/python
    "$PY" -m pip install -q --disable-pip-version-check -e ".${extras:+[$extras]}"
}
