"""`Gate.screen_tuned` (the CLI's `scan --tuned`) on a merged checkpoint built here from a fixture
adapter: the same numbers as the CLI, the adapter's rank detected in every touched matrix, and the
same max |cos| as screening the adapter itself."""

from __future__ import annotations

import json

import numpy as np
import pytest

import intruder_gate as ig
from conftest import FIXTURES, adapter_modules, numbers, read_safetensors, write_safetensors

_ST = {"<f4": "F32", "<i8": "I64", "<f2": "F16", "<f8": "F64"}


@pytest.fixture(scope="module")
def merged(minilm_base, tmp_path_factory):
    """The MiniLM base with lora_r16_qv merged in (W0 + s·B·A in f64, stored f32)."""
    tensors = read_safetensors(minilm_base)
    touched = set()
    for module, (a, b, scale) in adapter_modules("lora_r16_qv").items():
        name = f"{module}.weight"
        w = tensors[name].astype(np.float64) + scale * (b.astype(np.float64) @ a.astype(np.float64))
        tensors[name] = w.astype(np.float32)
        touched.add(name)
    path = tmp_path_factory.mktemp("merged") / "model.safetensors"
    write_safetensors(path, {k: (_ST[v.dtype.str], v.tobytes(), list(v.shape))
                             for k, v in tensors.items()})
    return path, touched


def test_merged_checkpoint_equals_cli(ref, minilm_base, merged):
    path, touched = merged
    gate = ig.Gate(minilm_base, cache_dir=None, method="auto", seed=12345)
    report = gate.screen_tuned(path)
    p = ref.run("scan", "--base", str(minilm_base), "--tuned", str(path), "--no-cache",
                "--method", "auto", "--seed", "12345", "--format", "json")
    assert p.returncode in (0, 1), p.stderr
    cli = json.loads(p.stdout)
    assert numbers(report.to_dict()) == numbers(cli)
    assert report.method == "auto" and gate.method == "auto" and gate.seed == 12345
    assert {m.base_tensor for m in report.modules} == touched
    assert all(m.detected_rank == 16 and m.solver == "merged-lora" for m in report.modules)
    assert all(0.0 <= m.low_rank_residual < 1e-3 for m in report.modules)
    # Every other 2-D tensor is byte-identical to the base, listed and not screened.
    assert report.unchanged and touched.isdisjoint(report.unchanged)
    with pytest.raises(ig.InvalidArgumentError, match="nothing to clamp"):
        gate.clamp(report)


def test_merged_checkpoint_agrees_with_the_adapter_scan(minilm_base, merged):
    path, _ = merged
    gate = ig.Gate(minilm_base, cache_dir=None, method="auto")
    tuned = {m.base_tensor: m for m in gate.screen_tuned(path).modules}
    adapter = ig.Gate(minilm_base, cache_dir=None).screen_adapter(FIXTURES / "lora_r16_qv")
    for m in adapter.modules:
        t = tuned[m.base_tensor]
        # The checkpoint stores W' in f32: its rounding, not the method, bounds the difference.
        np.testing.assert_allclose(t.max_cos, m.max_cos, atol=1e-4)
        np.testing.assert_allclose(t.singular_values, m.singular_values, rtol=1e-5)
        assert t.intruders == m.intruders


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "fast"}, "method must be"),
    ({"seed": -1}, "seed must be"),
    ({"seed": 2**64}, "seed must be"),
])
def test_bad_settings_are_invalid_arguments(kwargs, message):
    with pytest.raises(ig.InvalidArgumentError, match=message):
        ig.Gate(cache_dir=None, **kwargs)


def test_a_file_that_is_no_checkpoint_is_a_clear_error(minilm_base, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not a model")
    with pytest.raises(ig.IntruderGateError, match="not a safetensors file"):
        ig.Gate(minilm_base, cache_dir=None).screen_tuned(bad)
