#!/usr/bin/env bash
# The GPU check: run once on a machine with an NVIDIA GPU. Builds in release (or uses prebuilt
# binaries from $IG_PREBUILT), runs the CUDA tests, then times `index` and a warm `scan` on a
# synthetic Llama-7B-shaped model generated on the spot (LAYERS × q,k,v,o,gate,up,down; r=16,
# all-linear), CPU against GPU where the CPU part is affordable, and prints one table, with the
# randomized top-k solver's and the rank-revealing sketch's device rows (from their device tests
# on Llama-shaped bf16 layers: a fine-tuned one, and a merged LoRA for `scan --tuned`).
# IG_REQUIRE_CUDA=1: a CUDA test that cannot open the device fails instead of skipping.
#
#   scripts/gpu-check.sh            # LAYERS=32 by default; WORK=dir keeps the files;
#                                   # SKIP_TESTS=1 skips the test binaries
set -euo pipefail
cd "$(dirname "$0")/.."
LAYERS=${LAYERS:-32}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
export IG_REQUIRE_CUDA=1

if [ -n "${IG_PREBUILT:-}" ]; then
  BIN="$IG_PREBUILT/intruder-gate"
  TESTS=("$IG_PREBUILT"/test-*)
else
  cargo build --release
  BIN=target/release/intruder-gate
  mapfile -t TESTS < <(cargo test --release --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"] in ("intruder_gate","cuda"): print(m["executable"])')
fi

# cudarc built for CUDA 12 looks for lib<name>.so / .so.12 / .so.11 …; on a CUDA 13 machine give
# it unversioned links to whatever the system has.
libdir="$WORK/cuda-libs"; mkdir -p "$libdir"; extra=""
for name in cublas cublasLt cusolver curand cusparse nvJitLink; do
  f=$(ldconfig -p | awk -v n="^lib$name[.]so" '$1 ~ n {print $NF; exit}')
  [ -z "$f" ] && f=$(ls /usr/local/cuda/lib64/lib$name.so.* 2>/dev/null | head -1 || true)
  [ -z "$f" ] && f=$(find / -xdev -name "lib$name.so.*" -path '*nvidia*' 2>/dev/null | head -1 || true)
  if [ -n "$f" ]; then ln -sf "$f" "$libdir/lib$name.so"; extra="$extra:$(dirname "$f")"; fi
done
export LD_LIBRARY_PATH="$libdir$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)
echo "== device: $device, driver $driver, $(nproc) CPU cores"

echo "== CUDA tests"
[ -n "${SKIP_TESTS:-}" ] && TESTS=()
: > "$WORK/tests.log"
for t in "${TESTS[@]}"; do
  case "$t" in
    *intruder_gate-*|*/test-lib) "$t" --test-threads=1 --nocapture backend::cuda ;;
    *) "$t" --test-threads=1 --nocapture ;;
  esac 2>&1 | tee -a "$WORK/tests.log" # pipefail + errexit: a failing test stops the check
done
# The randomized solver's device row, printed by its device test (empty with SKIP_TESTS).
rsvd_row=$(grep -h '^gpu-check randomized:' "$WORK/tests.log" | sed 's/^gpu-check randomized: //' | tail -1 || true)
# The rank-revealing sketch's device row (`scan --tuned` on a merged checkpoint), likewise.
merged_row=$(grep -h '^gpu-check merged:' "$WORK/tests.log" | sed 's/^gpu-check merged: //' | tail -1 || true)

now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

echo "== synthetic Llama-shaped model: $LAYERS layers × 7 modules, bf16, adapter r=16"
t0=$(now); "$BIN" synth --out "$WORK/llama" --layers "$LAYERS" --rank 16 --dtype bf16; t1=$(now)
echo "generated in $(secs $t0 $t1) s"
B="$WORK/llama/base"

echo "== GPU index (all $((LAYERS*7)) tensors, f16 cache)"
t0=$(now); "$BIN" index --base "$B" --cache-dir "$WORK/cache-gpu" --cache-f16 --backend cuda 2>&1 | tail -2; t1=$(now)
gpu_index=$(secs $t0 $t1)
echo "== GPU warm scan (all layers)"
t0=$(now); "$BIN" scan --base "$B" --adapter "$WORK/llama/adapter" --cache-dir "$WORK/cache-gpu" --cache-f16 --backend cuda --format json > "$WORK/gpu-scan.json"; t1=$(now)
gpu_scan=$(secs $t0 $t1)
echo "== CPU warm scan (all layers, same cache)"
t0=$(now); "$BIN" scan --base "$B" --adapter "$WORK/llama/adapter" --cache-dir "$WORK/cache-gpu" --cache-f16 --backend cpu --format json > "$WORK/cpu-scan.json"; t1=$(now)
cpu_scan=$(secs $t0 $t1)
echo "== CPU index of layer 0 only (7 tensors)"
t0=$(now); "$BIN" index --base "$B" --cache-dir "$WORK/cache-cpu" --backend cpu --include '^model\.layers\.0\.' 2>&1 | tail -1; t1=$(now)
cpu_index_l0=$(secs $t0 $t1)
echo "== layer 0 screened from CPU- and GPU-computed spectra (f32 caches)"
t0=$(now); "$BIN" index --base "$B" --cache-dir "$WORK/cache-gpu32" --backend cuda --include '^model\.layers\.0\.' 2>&1 | tail -1; t1=$(now)
gpu_index_l0=$(secs $t0 $t1)
"$BIN" scan --base "$B" --adapter "$WORK/llama/adapter-layer0" --cache-dir "$WORK/cache-cpu" --backend cpu --format json > "$WORK/l0-cpu.json"
"$BIN" scan --base "$B" --adapter "$WORK/llama/adapter-layer0" --cache-dir "$WORK/cache-gpu32" --backend cuda --format json > "$WORK/l0-gpu.json"

python3 - "$WORK" "$device" "$driver" "$LAYERS" "$gpu_index" "$gpu_scan" "$cpu_scan" "$cpu_index_l0" "$gpu_index_l0" "${rsvd_row:-}" "${merged_row:-}" <<'PY'
import json, sys
work, device, driver, layers = sys.argv[1:5]
gpu_index, gpu_scan, cpu_scan, cpu_l0, gpu_l0 = map(float, sys.argv[5:10])
rsvd_row = sys.argv[10] or "unmeasured (tests skipped)"
merged_row = sys.argv[11] or "unmeasured (tests skipped)"
layers = int(layers)
load = lambda n: json.load(open(f"{work}/{n}"))
c, g = load("l0-cpu.json"), load("l0-gpu.json")
dcos = max(abs(a - b) for mc, mg in zip(c["modules"], g["modules"]) for a, b in zip(mc["max_cos"], mg["max_cos"]))
same = all(mc["intruders"] == mg["intruders"] for mc, mg in zip(c["modules"], g["modules"]))
gs, cs = load("gpu-scan.json"), load("cpu-scan.json")
print()
print(f"| device | {device} (driver {driver}) |")
print("|---|---|")
print(f"| model | synthetic Llama-7B shape, {layers} layers × 7 modules, bf16; adapter r=16 all-linear |")
print(f"| index, GPU, all {layers*7} tensors | {gpu_index:.1f} s |")
print(f"| index, layer 0 (7 tensors): CPU / GPU | {cpu_l0:.1f} s / {gpu_l0:.1f} s = {cpu_l0/gpu_l0:.1f}x |")
print(f"| index, all layers, CPU (extrapolated from layer 0) | {cpu_l0*layers:.0f} s |")
print(f"| warm scan, all {len(gs['modules'])} modules: CPU / GPU | {cpu_scan:.1f} s / {gpu_scan:.1f} s = {cpu_scan/gpu_scan:.1f}x |")
print(f"| verdicts CPU vs GPU (layer 0) | {'identical' if same else 'DIFFERENT'}; intruders {c['total_intruders']} / {g['total_intruders']} |")
print(f"| max abs diff of max_cos, CPU vs GPU spectra (layer 0) | {dcos:.2e} |")
print(f"| intruders found (all layers): CPU scan / GPU scan | {cs['total_intruders']} / {gs['total_intruders']} |")
print(f"| randomized top-k on the device (Philox sketch, DGEMM, QR, syevd; residuals host-checked) | {rsvd_row} |")
print(f"| rank-revealing sketch of W' − W0 on the device (`scan --tuned --backend cuda`, merged layer; residual host-checked) | {merged_row} |")
PY
