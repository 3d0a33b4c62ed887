"""One Gate used from 8 Python threads at once gives the serial reports, in parallel."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import intruder_gate as ig
from conftest import ADAPTERS, FIXTURES, adapter_modules, numbers


def test_eight_threads_equal_serial(minilm_base):
    gate = ig.Gate(minilm_base, cache_dir=None)
    jobs = [ADAPTERS[i % len(ADAPTERS)] for i in range(8)]
    for name in ADAPTERS:  # base spectra computed once, so both runs do the same work
        gate.screen_adapter(FIXTURES / name)

    def one(i):
        name = jobs[i]
        if i % 2:  # half from directories, half from numpy arrays
            return numbers(gate.screen(adapter_modules(name), name=name).to_dict())
        return numbers(gate.screen_adapter(FIXTURES / name).to_dict())

    t0 = time.perf_counter()
    serial = [one(i) for i in range(8)]
    t1 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(one, range(8)))
    t2 = time.perf_counter()
    for s, t in zip(serial, threaded, strict=True):
        s.pop("adapter", None), t.pop("adapter", None)
        assert s == t
    print(f"\n8 screenings: serial {t1 - t0:.3f} s, 8 threads {t2 - t1:.3f} s, "
          f"speed-up {(t1 - t0) / (t2 - t1):.2f}x (library threads: one per core)")


def test_threads_one_per_gate_speed_up(minilm_base):
    """With one library worker per gate, parallelism can only come from the Python threads."""
    gate = ig.Gate(minilm_base, cache_dir=None, threads=1)
    gate.screen_adapter(FIXTURES / "lora_r2")
    t0 = time.perf_counter()
    serial = [numbers(gate.screen_adapter(FIXTURES / "lora_r2").to_dict()) for _ in range(8)]
    t1 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(
            lambda _: numbers(gate.screen_adapter(FIXTURES / "lora_r2").to_dict()), range(8)))
    t2 = time.perf_counter()
    assert serial == threaded
    print(f"\nthreads=1 gate, 8 screenings: serial {t1 - t0:.3f} s, 8 threads {t2 - t1:.3f} s, "
          f"speed-up {(t1 - t0) / (t2 - t1):.2f}x")
