#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser and of the whole adapter load (fuzz/, cargo-fuzz +
# libFuzzer). Runs each target for SECONDS (default 45; CI runs 30) from the committed seeds
# in fuzz/corpus/<target>/ and prints executions, coverage and crashes per target; exits 1 when
# any target found a crash, timeout or out-of-memory input (saved under $FUZZ_OUT/<target>/).
#
#   scripts/fuzz.sh [SECONDS]
#   FUZZ_SANITIZER=address scripts/fuzz.sh 600   # nightly, AddressSanitizer (default: none, stable)
#   FUZZ_TARGETS="policy adapter_dir" scripts/fuzz.sh
#   FUZZ_KEEP_GOING=1 scripts/fuzz.sh 600        # fork mode: record crashes and carry on
#   FUZZ_SEED=1 scripts/fuzz.sh 30               # libFuzzer's -seed (default: a random one each
#                                                # run); CI fixes it, so a failure there replays
#
# The committed seeds are only read; what a run adds goes to $FUZZ_OUT/<target>/corpus
# (default fuzz/out, ignored by git). Replay one input: cargo fuzz run -s none TARGET FILE.
set -euo pipefail
secs=${1:-45}
cd "$(dirname "$0")/.."
root=$PWD
out=${FUZZ_OUT:-$root/fuzz/out}
targets=${FUZZ_TARGETS:-safetensors_header adapter_config policy adapter_dir ffi_screen}
san=${FUZZ_SANITIZER:-none}

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
toolchain=()
if [ "$san" != none ]; then
    toolchain=(+nightly) # sanitizers need -Zsanitizer
fi
# Largest input per target: above every seed, small enough that no single input is slow.
max_len() {
    case $1 in
        safetensors_header) echo 1048576 ;;
        adapter_dir) echo 65536 ;;
        adapter_config) echo 16384 ;;
        *) echo 4096 ;;
    esac
}

start=$(date +%s)
if [ -z "${FUZZ_TARGETS:-}" ]; then
    cargo "${toolchain[@]}" fuzz build -s "$san"
else
    for t in $targets; do cargo "${toolchain[@]}" fuzz build -s "$san" "$t"; done
fi
echo "fuzz build: $(($(date +%s) - start)) s"

keep_going=()
if [ "${FUZZ_KEEP_GOING:-0}" = 1 ]; then
    keep_going=(-fork=1 -ignore_crashes=1 -ignore_timeouts=1 -ignore_ooms=1)
fi
seed=()
if [ -n "${FUZZ_SEED:-}" ]; then
    seed=(-seed="$FUZZ_SEED")
fi

failed=0
summary=()
for t in $targets; do
    mkdir -p "$out/$t/corpus" "$out/$t/artifacts"
    log=$out/$t/log
    before=$(find "$out/$t/artifacts" -type f | wc -l)
    echo "== $t: ${secs}s (log: $log)"
    set +e
    cargo "${toolchain[@]}" fuzz run -s "$san" "$t" "$out/$t/corpus" "fuzz/corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len="$(max_len "$t")" \
        -artifact_prefix="$out/$t/artifacts/" -print_final_stats=1 "${keep_going[@]}" "${seed[@]}" \
        >"$log" 2>&1
    rc=$?
    set -e
    # libFuzzer's last status line ("#N DONE cov: … ft: …", or fork mode's "#N: cov: …").
    last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1 || true)
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{s+=$2} END {print s+0}' || true)
    if [ "$execs" = 0 ]; then
        execs=$(sed -E 's/^#([0-9]+).*/\1/' <<<"$last")
    fi
    cov=$(grep -oE 'cov: [0-9]+' <<<"$last" | awk '{print $2}')
    ft=$(grep -oE 'ft: [0-9]+' <<<"$last" | awk '{print $2}')
    found=$(($(find "$out/$t/artifacts" -type f | wc -l) - before))
    summary+=("$(printf '%-20s %6ss %12s execs  cov %6s  ft %6s  new crash/timeout/oom inputs %s (rc %s)' \
        "$t" "$secs" "${execs:-?}" "${cov:-?}" "${ft:-?}" "$found" "$rc")")
    if [ "$rc" != 0 ] || [ "$found" != 0 ]; then
        failed=1
        grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -8 || true
    fi
done
printf '%s\n' "${summary[@]}"
exit $failed
