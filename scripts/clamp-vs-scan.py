#!/usr/bin/env python3
"""Times `intruder-gate clamp` against `intruder-gate scan` as fresh processes, alternating, on the
MiniLM fixtures: cold (`--no-cache`) and warm (a disk cache filled first). Prints medians of wall
time and of CPU time (user + sys of the child, less sensitive to a loaded machine).

Usage: scripts/clamp-vs-scan.py [N]   (N rounds, default 7; needs target/release/intruder-gate)
"""
import resource, statistics, subprocess, sys, tempfile, time

n = int(sys.argv[1]) if len(sys.argv) > 1 else 7
exe = "target/release/intruder-gate"
base = subprocess.check_output(["scripts/fetch-minilm.sh"], text=True).strip()


def run(args):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([exe, *args], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


with tempfile.TemporaryDirectory() as tmp:
    print("| adapter | cache | scan wall | clamp wall | clamp / scan | scan CPU | clamp CPU | clamp / scan CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ["lora_r2", "lora_r16_qv", "rslora_r16"]:
        common = ["--backend", "cpu", "--base", base, "--adapter", f"tests/fixtures/minilm/{name}"]
        cache = ["--cache-dir", f"{tmp}/cache-{name}"]
        run(["scan", *common, *cache])
        for label, c in [("cold (--no-cache)", ["--no-cache"]), ("warm (disk)", cache)]:
            t = {"scan": [], "clamp": []}
            for _ in range(n):
                t["scan"].append(run(["scan", *common, *c]))
                t["clamp"].append(run(["clamp", *common, *c, "--out", f"{tmp}/out", "--force"]))
            m = {k: [statistics.median(x[i] for x in v) for i in (0, 1)] for k, v in t.items()}
            ms = lambda x: f"{x * 1e3:.0f} ms"
            print(
                f"| {name} | {label} | {ms(m['scan'][0])} | {ms(m['clamp'][0])} | "
                f"{m['clamp'][0] / m['scan'][0]:.2f}× | {ms(m['scan'][1])} | {ms(m['clamp'][1])} | "
                f"{m['clamp'][1] / m['scan'][1]:.2f}× |",
                flush=True,
            )
