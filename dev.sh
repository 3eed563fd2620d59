#!/usr/bin/env bash
# Project commands. `./dev.sh demo` sets up and runs the demo; `./dev.sh test` sets up and runs the tests;
# `./dev.sh screenshots` regenerates docs/img/ from a short real run.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=.venv
DEBS=(mosquitto mosquitto-clients libcoap3-bin curl)
# Headless Chromium and its WebDriver: the browser tests of the report and the status page,
# and `./dev.sh screenshots`.
BROWSER_DEBS=(chromium chromium-driver)

setup_venv() {
  local extras=$1
  if [[ ! -x $VENV/bin/python ]]; then
    "$PYTHON" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install --quiet --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --quiet --disable-pip-version-check -e ".$extras"
}

missing_debs() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  echo "${missing[@]:-}"
}

setup_debs() {
  local missing
  missing=$(missing_debs "$@")
  [[ -z $missing ]] && return 0
  local sudo=()
  [[ $(id -u) -ne 0 ]] && sudo=(sudo)
  echo "installing Debian packages: $missing"
  "${sudo[@]}" apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

case "${1:-}" in
  setup)
    setup_venv ""
    ;;
  demo)
    shift
    setup_venv "[demo]"
    exec "$VENV/bin/edgesieve" demo "$@"
    ;;
  test)
    shift
    setup_debs "${DEBS[@]}" "${BROWSER_DEBS[@]}"
    setup_venv "[test,demo]"
    "$VENV/bin/ruff" check --no-cache .
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  protos)
    setup_venv "[test]"
    "$VENV/bin/python" -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. protos/uplink.proto
    ;;
  screenshots)
    shift
    setup_debs "${DEBS[@]}" "${BROWSER_DEBS[@]}"
    setup_venv "[test,demo]"
    exec "$VENV/bin/python" -m tests.browser.screenshots docs/img "$@"
    ;;
  bench)
    shift
    setup_debs "${DEBS[@]}"
    setup_venv "[test]"
    for script in benchmarks/bench_*.py; do
      echo "== $script"
      "$VENV/bin/python" "$script" "$@"
    done
    ;;
  *)
    echo "usage: ./dev.sh {setup|demo|test|screenshots|bench|protos} [args...]" >&2
    exit 2
    ;;
esac
