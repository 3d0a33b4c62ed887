"""Screening through Python equals the CLI's JSON exactly: from a directory, from numpy arrays
(f32, and f16 against the CLI on the same base stored as f16)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import intruder_gate as ig
from conftest import (ADAPTERS, FIXTURES, adapter_modules, base_matrices, nan_adapter, numbers,
                      write_safetensors)


@pytest.fixture(scope="module")
def gate(minilm_base):
    return ig.Gate(minilm_base, cache_dir=None)


@pytest.mark.parametrize("name", ADAPTERS)
def test_directory_equals_cli(gate, ref, minilm_base, name):
    report = gate.screen_adapter(FIXTURES / name)
    cli = ref.scan(minilm_base, FIXTURES / name)
    assert numbers(report.to_dict()) == numbers(cli)
    # The typed view and the JSON say the same.
    assert report.verdict == cli["verdict"]
    assert report.total_intruders == cli["total_intruders"]
    assert report.fired_rules == cli["fired_rules"]
    assert report.error is None
    for m, c in zip(report.modules, cli["modules"], strict=True):
        assert (m.module, m.base_tensor, list(m.shape), m.rank) == (
            c["module"], c["base_tensor"], c["shape"], c["rank"])
        assert (m.singular_values, m.max_cos, m.intruders) == (
            c["singular_values"], c["max_cos"], c["intruders"])
    assert json.loads(report.to_json()) == report.to_dict()


@pytest.mark.parametrize("name", ADAPTERS)
def test_numpy_arrays_equal_cli(ref, minilm_base, name):
    base = base_matrices(minilm_base)
    gate = ig.Gate(base, cache_dir=None)
    report = gate.screen(adapter_modules(name), name=name)
    assert numbers(report.to_dict()) == numbers(ref.scan(minilm_base, FIXTURES / name))


def test_float16_base_equals_cli_on_float16_file(ref, minilm_base, tmp_path):
    """The same f16 bytes handed over in memory and read from a file give the same numbers."""
    base16 = {k: v.astype(np.float16) for k, v in base_matrices(minilm_base).items()}
    path = tmp_path / "minilm-f16.safetensors"
    write_safetensors(path, {k: ("F16", v.tobytes(), list(v.shape)) for k, v in base16.items()})
    gate = ig.Gate(base16, cache_dir=None)
    for name in ADAPTERS:
        report = gate.screen(adapter_modules(name), name=name)
        assert numbers(report.to_dict()) == numbers(ref.scan(path, FIXTURES / name))


def test_module_keys_may_be_base_tensor_names(gate, minilm_base):
    modules = adapter_modules("lora_r2")
    by_tensor = {k + ".weight": v for k, v in modules.items()}
    a = gate.screen(modules).to_dict()
    b = gate.screen(by_tensor).to_dict()
    assert numbers(a) == numbers(b)


def test_base_can_be_attached_later(minilm_base):
    gate = ig.Gate(cache_dir=None)
    gate.attach_base(minilm_base)
    assert gate.screen_adapter(FIXTURES / "lora_r2").verdict in {"accept", "warn", "clamp", "reject"}
    with pytest.raises(ig.InvalidArgumentError, match="already attached"):
        gate.attach_base(minilm_base)


def test_invalid_adapter_is_a_reject_report(gate, ref, minilm_base, tmp_path):
    """A malformed directory is a reject report carrying the library's error (the CLI prints the
    same message and exits non-zero)."""
    bad = nan_adapter(tmp_path)
    report = gate.screen_adapter(bad)
    assert report.verdict == "reject" and report.error["kind"] == "non_finite"
    p = ref.run("scan", "--base", str(minilm_base), "--adapter", str(bad), "--no-cache")
    assert p.returncode != 0 and report.error["message"] in p.stderr
    assert report.modules == []
    # A missing file is an I/O failure, not a verdict: raised.
    with pytest.raises(ig.IoError, match="adapter_model.safetensors"):
        gate.screen_adapter(tmp_path)


def test_in_memory_nan_raises(gate):
    modules = adapter_modules("lora_r2")
    name, (a, b, s) = next(iter(modules.items()))
    b = b.copy()
    b[3, 1] = np.nan
    with pytest.raises(ig.NonFiniteError):
        gate.screen({name: (a, b, s)})


def test_in_memory_shape_mismatch_is_reported(gate):
    modules = adapter_modules("lora_r2")
    name, (a, b, s) = next(iter(modules.items()))
    with pytest.raises(ig.ShapeError, match="lora_B must be"):
        gate.screen({name: (a, b[:, :1], s)})
    # A wrong in-features count: the library's shape check against the base.
    report = gate.screen({name: (a[:, :100], b, s)})
    assert report.verdict == "reject" and report.error["kind"] == "shape"


def test_policy_dict_and_path(minilm_base, ref, tmp_path):
    policy = {"rules": [{"metric": "total_intruders", "threshold": 1, "action": "reject"}]}
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    by_dict = ig.Gate(minilm_base, policy=policy, cache_dir=None)
    by_path = ig.Gate(minilm_base, policy=str(path), cache_dir=None)
    a = by_dict.screen_adapter(FIXTURES / "lora_r16_qv")
    b = by_path.screen_adapter(FIXTURES / "lora_r16_qv")
    cli = ref.scan(minilm_base, FIXTURES / "lora_r16_qv", "--policy", str(path))
    assert a.verdict == b.verdict == cli["verdict"] == "reject"
    assert a.fired_rules == b.fired_rules == cli["fired_rules"]


def test_bad_policy_is_the_librarys_error(ref, minilm_base, tmp_path):
    bad = {"rules": [{"metric": "nope", "threshold": 1, "action": "warn"}]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ig.InvalidArgumentError) as e:
        ig.Gate(policy=bad, cache_dir=None)
    p = ref.run("scan", "--base", str(minilm_base), "--adapter", str(FIXTURES / "lora_r2"),
                "--no-cache", "--policy", str(path))
    assert p.returncode != 0 and str(e.value) in p.stderr
