"""Clamping through Python equals the CLI's `clamp` output; the PEFT directory is written whole."""

from __future__ import annotations

import json

import numpy as np
import pytest

import intruder_gate as ig
from conftest import FIXTURES, adapter_modules, nan_adapter, read_safetensors

ADAPTER = FIXTURES / "lora_r16_qv"  # the fixture with intruders at ε = 0.5


@pytest.fixture(scope="module")
def gate(minilm_base):
    return ig.Gate(minilm_base, cache_dir=None)


def cli_clamp(ref, base, out, *extra):
    p = ref.run("clamp", "--base", str(base), "--adapter", str(ADAPTER), "--out", str(out),
                "--no-cache", *extra)
    assert p.returncode == 0, p.stderr
    return read_safetensors(out / "adapter_model.safetensors"), json.loads(
        (out / "adapter_config.json").read_text())


@pytest.mark.parametrize("mode", ["exact", "rank-preserving"])
def test_clamp_equals_cli(gate, ref, minilm_base, tmp_path, mode):
    report = gate.screen_adapter(ADAPTER)
    assert report.total_intruders > 0
    clamped = gate.clamp(report, lam=0.5, mode=mode)
    clamped.save_pretrained(tmp_path / "py")
    cli_tensors, cli_config = cli_clamp(ref, minilm_base, tmp_path / "cli", "--lambda", "0.5",
                                        "--mode", mode)
    py_tensors = read_safetensors(tmp_path / "py" / "adapter_model.safetensors")
    assert py_tensors.keys() == cli_tensors.keys()
    for k in cli_tensors:
        assert np.array_equal(py_tensors[k], cli_tensors[k]), k
    assert json.loads((tmp_path / "py" / "adapter_config.json").read_text()) == cli_config
    # The arrays handed to Python are the written factors (f32 input, f32 output).
    for name, (a, b) in clamped.modules.items():
        key = f"base_model.model.{name}"
        assert np.array_equal(a, cli_tensors[key + ".lora_A.weight"])
        assert np.array_equal(b, cli_tensors[key + ".lora_B.weight"])
        assert a.shape == (clamped.ranks[name], 384) and a.flags.writeable
    assert clamped.clamped_directions == report.total_intruders
    exact_rank = {m.module: m.rank + len(m.intruders) for m in report.modules}
    if mode == "exact":
        assert clamped.ranks == exact_rank
    else:
        assert set(clamped.ranks.values()) == {16}


def test_clamp_in_memory_equals_clamp_of_directory(gate, minilm_base):
    a = gate.clamp(gate.screen_adapter(ADAPTER))
    b = gate.clamp(gate.screen(adapter_modules("lora_r16_qv"), name="lora_r16_qv"))
    for name, (a1, b1) in a.modules.items():
        a2, b2 = b.modules[name]
        assert np.array_equal(a1, a2) and np.array_equal(b1, b2)
    assert a.to_dict() == b.to_dict()


def test_pad_rank_to(gate):
    clamped = gate.clamp(gate.screen_adapter(ADAPTER), pad_rank_to=32)
    assert set(clamped.ranks.values()) == {32} and clamped.rank == 32
    with pytest.raises(ig.InvalidArgumentError, match="padded rank"):
        gate.clamp(gate.screen_adapter(ADAPTER), pad_rank_to=2)


def test_bad_clamp_arguments(gate, minilm_base):
    report = gate.screen_adapter(ADAPTER)
    for kwargs, match in [({"lam": -1.0}, "lambda"), ({"target": "some"}, "target"),
                          ({"mode": "fast"}, "mode"), ({"pad_rank_to": -1}, "pad_rank_to")]:
        with pytest.raises(ig.InvalidArgumentError, match=match):
            gate.clamp(report, **kwargs)
    other = ig.Gate(minilm_base, cache_dir=None)
    with pytest.raises(ig.InvalidArgumentError, match="another Gate"):
        other.clamp(report)


def test_rejected_report_cannot_be_clamped(gate, tmp_path):
    report = gate.screen_adapter(nan_adapter(tmp_path))
    assert report.verdict == "reject" and report.error["kind"] == "non_finite"
    with pytest.raises(ig.InvalidArgumentError, match="nothing to clamp"):
        gate.clamp(report)


def test_save_pretrained_failure_leaves_nothing(gate, tmp_path):
    clamped = gate.clamp(gate.screen_adapter(ADAPTER))
    target = tmp_path / "taken"
    target.write_text("a file, not a directory")
    with pytest.raises(ig.IntruderGateError):
        clamped.save_pretrained(target)
    assert target.read_text() == "a file, not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    with pytest.raises(ig.InvalidArgumentError, match="dtype"):
        clamped.save_pretrained(tmp_path / "x", dtype="int8")


def test_save_pretrained_dtype(gate, tmp_path):
    clamped = gate.clamp(gate.screen_adapter(ADAPTER))
    clamped.save_pretrained(tmp_path / "half", dtype="float16")
    header_len = int.from_bytes((tmp_path / "half" / "adapter_model.safetensors").read_bytes()[:8],
                                "little")
    header = json.loads((tmp_path / "half" / "adapter_model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
