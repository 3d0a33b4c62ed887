"""Base tensors from numpy: borrowed without a copy and kept alive; bad ones refused clearly."""

from __future__ import annotations

import gc
import sys

import numpy as np
import pytest

import intruder_gate as ig
from conftest import FIXTURES, adapter_modules, base_matrices, numbers


def test_gate_keeps_borrowed_arrays_alive(minilm_base, ref):
    base = base_matrices(minilm_base)
    probe = next(iter(base.values()))
    before = sys.getrefcount(probe)
    gate = ig.Gate(base, cache_dir=None)
    assert sys.getrefcount(probe) == before + 1  # the gate holds the array itself: no copy
    del base, probe
    gc.collect()
    report = gate.screen(adapter_modules("lora_r2"), name="lora_r2")
    assert numbers(report.to_dict()) == numbers(ref.scan(minilm_base, FIXTURES / "lora_r2"))


def test_released_with_the_gate():
    arr = np.ones((8, 8), dtype=np.float32)
    before = sys.getrefcount(arr)
    gate = ig.Gate({"w.weight": arr}, cache_dir=None)
    assert sys.getrefcount(arr) == before + 1
    del gate
    gc.collect()
    assert sys.getrefcount(arr) == before


@pytest.mark.parametrize(
    "value, error, match",
    [
        (np.ones((8, 8), dtype=np.float32).T[::2], ig.InvalidArgumentError, "contiguous"),
        (np.ones((8, 8), dtype=np.int32), ig.UnsupportedError, "dtype"),
        (np.ones((8, 8), dtype=">f4"), ig.UnsupportedError, "dtype"),
        (np.ones((2, 8, 8), dtype=np.float32), ig.ShapeError, "2-D"),
        (np.ones(8, dtype=np.float32), ig.ShapeError, "2-D"),
        (np.ones((0, 8), dtype=np.float32), ig.LimitError, "shape"),
    ],
)
def test_bad_base_tensors(value, error, match):
    gate = ig.Gate(cache_dir=None)
    with pytest.raises(error, match=match):
        gate.attach_base_tensors({"w.weight": value})


def test_nothing_attached_when_one_tensor_is_bad():
    gate = ig.Gate(cache_dir=None)
    good = np.ones((8, 8), dtype=np.float32)
    with pytest.raises(ig.UnsupportedError):
        gate.attach_base_tensors({"a.weight": good, "b.weight": good.astype(np.int8)})
    assert gate._host_tensor_names() == []
    gate.attach_base_tensors({"a.weight": good})
    with pytest.raises(ig.InvalidArgumentError, match="already attached"):
        gate.attach_base_tensors({"a.weight": good})


def test_not_a_mapping():
    with pytest.raises(ig.InvalidArgumentError, match="mapping"):
        ig.Gate(cache_dir=None).attach_base_tensors([np.ones((2, 2))])
    with pytest.raises(ig.InvalidArgumentError, match="mapping"):
        ig.Gate(cache_dir=None).screen([1, 2])


def test_adapter_factors_may_be_any_layout(minilm_base):
    """A and B are copied anyway, so non-contiguous and f64 factors are fine and equal."""
    gate = ig.Gate(base_matrices(minilm_base), cache_dir=None)
    modules = adapter_modules("lora_r2")
    fortran = {k: (np.asfortranarray(a), np.asfortranarray(b), s) for k, (a, b, s) in modules.items()}
    assert numbers(gate.screen(fortran).to_dict()) == numbers(gate.screen(modules).to_dict())
