"""torch tensors (f32 / f16 / bf16) as base and factors: the CLI's numbers on the same bytes."""

from __future__ import annotations

import numpy as np
import pytest

import intruder_gate as ig
from conftest import ADAPTERS, FIXTURES, adapter_modules, base_matrices, numbers, skip_or_fail, write_safetensors

try:
    import torch
except ImportError as e:  # pragma: no cover - depends on the environment
    torch = None
    REASON = f"torch cannot be imported: {e}"


@pytest.fixture(scope="module", autouse=True)
def need_torch():
    if torch is None:
        skip_or_fail(REASON)


@pytest.fixture(scope="module")
def base32(minilm_base):
    return {k: torch.from_numpy(v) for k, v in base_matrices(minilm_base).items()}


def torch_modules(name, dtype=torch.float32 if torch else None):
    return {k: (torch.from_numpy(a).to(dtype), torch.from_numpy(b).to(dtype), s)
            for k, (a, b, s) in adapter_modules(name).items()}


@pytest.mark.parametrize("name", ADAPTERS)
def test_float32_tensors_equal_cli(ref, minilm_base, base32, name):
    gate = ig.Gate(base32, cache_dir=None)
    report = gate.screen(torch_modules(name), name=name)
    assert numbers(report.to_dict()) == numbers(ref.scan(minilm_base, FIXTURES / name))


@pytest.mark.parametrize("dtype, st", [("float16", "F16"), ("bfloat16", "BF16")])
def test_half_tensors_equal_cli_on_same_dtype_file(ref, base32, tmp_path, dtype, st):
    """The base in f16 / bf16: torch tensors borrowed in memory vs the CLI on a safetensors
    file holding the same bytes (torch's rounding, once)."""
    dt = getattr(torch, dtype)
    base = {k: v.to(dt) for k, v in base32.items()}
    path = tmp_path / f"minilm-{dtype}.safetensors"
    write_safetensors(path, {k: (st, v.view(torch.int16).numpy().tobytes(), list(v.shape))
                             for k, v in base.items()})
    gate = ig.Gate(base, cache_dir=None)
    for name in ADAPTERS:
        report = gate.screen(torch_modules(name), name=name)
        assert numbers(report.to_dict()) == numbers(ref.scan(path, FIXTURES / name))


def test_bf16_factors_are_read_as_bf16(base32, minilm_base):
    """bf16 A/B through DLPack-free raw storage equal the same values widened to f32 by torch."""
    gate = ig.Gate(base32, cache_dir=None)
    bf = torch_modules("lora_r2", torch.bfloat16)
    widened = {k: (a.float(), b.float(), s) for k, (a, b, s) in bf.items()}
    assert numbers(gate.screen(bf).to_dict()) == numbers(gate.screen(widened).to_dict())


def test_tensor_errors(base32):
    gate = ig.Gate(cache_dir=None)
    w = next(iter(base32.values()))
    with pytest.raises(ig.InvalidArgumentError, match="contiguous"):
        gate.attach_base_tensors({"w.weight": w.t()})
    with pytest.raises(ig.UnsupportedError, match="torch.int32"):
        gate.attach_base_tensors({"w.weight": w.to(torch.int32)})
    with pytest.raises(ig.ShapeError, match="2-D"):
        gate.attach_base_tensors({"w.weight": w[None]})
    with pytest.raises(ig.InvalidArgumentError, match="meta"):
        gate.attach_base_tensors({"w.weight": torch.empty(4, 4, device="meta")})


def test_requires_grad_parameters_are_fine(ref, minilm_base, base32):
    params = {k: torch.nn.Parameter(v.clone()) for k, v in base32.items()}
    gate = ig.Gate(params, cache_dir=None)
    report = gate.screen(torch_modules("lora_r2"), name="lora_r2")
    assert numbers(report.to_dict()) == numbers(ref.scan(minilm_base, FIXTURES / "lora_r2"))


def test_as_torch(minilm_base):
    gate = ig.Gate(minilm_base, cache_dir=None)
    clamped = gate.clamp(gate.screen_adapter(FIXTURES / "lora_r16_qv"))
    t = clamped.as_torch(dtype=torch.bfloat16)
    for name, (a, b) in clamped.modules.items():
        assert t[name][0].dtype == torch.bfloat16
        assert torch.equal(t[name][1], torch.from_numpy(b).to(torch.bfloat16))
        assert tuple(t[name][0].shape) == a.shape


@pytest.mark.skipif(torch is None or not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_base_is_copied_once_with_a_warning(ref, minilm_base, base32, caplog):
    cuda = {k: v.cuda() for k, v in base32.items()}
    with caplog.at_level("WARNING", logger="intruder_gate"):
        gate = ig.Gate(cuda, cache_dir=None)
    assert sum("copied to host memory" in r.message for r in caplog.records) == len(cuda)
    report = gate.screen(torch_modules("lora_r2"), name="lora_r2")
    assert numbers(report.to_dict()) == numbers(ref.scan(minilm_base, FIXTURES / "lora_r2"))
