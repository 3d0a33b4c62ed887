#!/usr/bin/env bash
# Soak: one long-lived gate in a C host (cpp_examples/soak.c) screening 10,000 synthetic
# in-memory adapters from several threads, mixed clean / planted-and-clamped / bad. Prints RSS,
# descriptors, threads and metrics cardinality every SAMPLE adapters and fails when any of
# them grows after the warm-up (see soak.c). About 5 minutes on 2 cores.
#
#   scripts/soak.sh [ADAPTERS=10000] [THREADS=4] [DIM=384] [SAMPLE=500] [WARMUP=1000] [RSS_SLACK_MIB=24]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --lib
out=target/soak
mkdir -p "$out"
gcc -O2 -Wall -Wextra -Werror -std=c11 -D_DEFAULT_SOURCE -pthread -Iinclude cpp_examples/soak.c \
    -Ltarget/release -Wl,-rpath,"$PWD/target/release" -lintruder_gate -lm -o "$out/soak"
exec "$out/soak" "$@"
