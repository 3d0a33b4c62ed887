#!/usr/bin/env bash
# The vLLM end-to-end test (python/tests/vllm), as CI runs it: creates or reuses the cached venv
# (scripts/python-env.sh), builds the extension from ./python into it, runs pytest.
# Skips, with the reason, only when the venv cannot be installed. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

set +e
venv=$(bash scripts/python-env.sh | tail -n1)
rc=$?
set -e
if [ "$rc" -eq 3 ]; then
  echo "vllm-e2e: SKIPPED: the vLLM venv cannot be installed here (reason above)"
  exit 0
elif [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
py=$venv/bin/python

start=$(date +%s)
# --no-build-isolation: the venv's maturin builds it (its PEP 517 hook runs `maturin` from PATH),
# nothing is fetched for the build.
PATH=$venv/bin:$PATH "$py" -m pip install -q --no-deps --no-build-isolation --force-reinstall ./python
echo "vllm-e2e: extension built and installed in $(($(date +%s) - start)) s"

timings=$(mktemp)
trap 'rm -f "$timings"' EXIT
start=$(date +%s)
set +e
INTRUDER_GATE_E2E_TIMINGS=$timings "$py" -m pytest -p no:cacheprovider -rs -v python/tests/vllm "$@"
rc=$?
set -e
echo "vllm-e2e: pytest took $(($(date +%s) - start)) s; timings: $(tr -d '\n ' <"$timings")"
exit "$rc"
