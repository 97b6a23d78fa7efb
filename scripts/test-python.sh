#!/usr/bin/env bash
# The Python client's tests (python/tests) against real brokers: installs
# the package (with pyzmq) and pytest, then runs them. The canopy binary is
# CANOPY_BIN, default $CARGO_TARGET_DIR/debug/canopy, else target/debug/canopy
# (build it first: scripts/test.sh does). Run by scripts/test.sh after the cargo tests.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
# Use the interpreter on PATH (pyenv's on CI) unless it is an externally
# managed one (Debian's), which gets a venv of its own instead.
PY=python3
if ! "$PY" -m pip --version >/dev/null 2>&1 \
    || "$PY" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))'; then
    "$PY" -m venv target/py-venv
    PY=target/py-venv/bin/python
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q ./python pytest
"$PY" -c 'import zmq; assert zmq.has("curve"), "pyzmq without CURVE"' \
    || { echo "canopy: $PY cannot import a pyzmq with CURVE after installing ./python" >&2; exit 1; }
# pytest exits 5 when it collects no test, which fails this script (set -e);
# a run where every test was skipped fails too.
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$PWD/$TARGET_DIR" ;; esac
CANOPY_BIN="${CANOPY_BIN:-$TARGET_DIR/debug/canopy}" "$PY" -m pytest -q -ra -p no:cacheprovider \
    --junitxml=target/pytest-python.xml python/tests
"$PY" - target/pytest-python.xml <<'PYEOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
if ran == 0:
    sys.exit("canopy: the Python tests ran no test")
PYEOF
