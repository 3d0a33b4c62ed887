"""Makes the vLLM end-to-end test's inputs locally: a tiny random Llama and PEFT adapters for it.

Nothing is downloaded: the tokenizer is trained here with `tokenizers`, the model is a
transformers `LlamaForCausalLM` with random weights saved as safetensors, and every adapter is
made by PEFT (`get_peft_model` + `save_pretrained`), then edited where a test needs a defect.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

HIDDEN = 256
LAYERS = 2
RANK = 8
TARGETS = ["q_proj", "v_proj"]
WORDS = (  # noqa: SIM905 (a sentence reads better than a 30-item list)
    "the a gate adapter model layer rank screen clamp base weight vector intruder value query "
    "key token server load serve cache reject accept warn matrix singular dimension spectrum"
).split()


def make_tokenizer(dst: Path, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(dst)
    return fast


def make_model(dst: Path, seed: int = 0) -> Path:
    """A 2-layer, 256-wide Llama with random weights (std 0.1, so greedy decoding is decisive)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dst.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(dst, seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=512,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        initializer_range=0.1,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(dst, safe_serialization=True)
    return dst


def make_adapter(model_dir: Path, dst: Path, seed: int, b_std: float = 1e-3) -> Path:
    """A PEFT LoRA (r 8, alpha 16, q_proj + v_proj) with B drawn from N(0, b_std²)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, lora_dropout=0.0)
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT initialises B to zero: an adapter that does nothing
            torch.nn.init.normal_(param, std=b_std)
    peft_model.save_pretrained(str(dst), safe_serialization=True)
    return dst


def _edit(src: Path, dst: Path, edit) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def _key(layer: int, proj: str, factor: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{factor}.weight"


def make_nan(good: Path, dst: Path) -> Path:
    """One NaN in layer 0's q_proj lora_B."""

    def edit(t):
        t[_key(0, "q_proj", "B")][3, 1] = float("nan")

    return _edit(good, dst, edit)


def make_wrong_shape(good: Path, dst: Path) -> Path:
    """Layer 0's q_proj lora_A as [8, 255] for a 256-wide q_proj."""

    def edit(t):
        k = _key(0, "q_proj", "A")
        t[k] = t[k][:, : HIDDEN - 1].contiguous()

    return _edit(good, dst, edit)


def make_planted(model_dir: Path, good: Path, dst: Path, seed: int = 7) -> Path:
    """Plants one intruder in both layers' q_proj: scaling·B·A gains 2·σ_max(W)·u vᵀ.

    u and v are random unit vectors, so the new top singular vector of W + ΔW is close to u,
    far from every base singular vector; 2 of 4 adapted matrices (≥ 25 %) → verdict clamp.
    """
    import torch
    from safetensors.torch import load_file

    base = load_file(str(model_dir / "model.safetensors"))
    scaling = 2.0  # lora_alpha / r
    gen = torch.Generator().manual_seed(seed)

    def edit(t):
        for layer in range(LAYERS):
            w = base[f"model.layers.{layer}.self_attn.q_proj.weight"].double()
            sigma = float(torch.linalg.svdvals(w)[0])
            u = torch.randn(w.shape[0], generator=gen, dtype=torch.float64)
            v = torch.randn(w.shape[1], generator=gen, dtype=torch.float64)
            u, v = u / u.norm(), v / v.norm()
            a, b = _key(layer, "q_proj", "A"), _key(layer, "q_proj", "B")
            t[a][0] = v.float()
            t[b][:, 0] = (2.0 * sigma / scaling * u).float()

    return _edit(good, dst, edit)


def make_all(root: Path) -> dict[str, Path]:
    """Everything the e2e test uses, under ``root``; returns name -> path."""
    root.mkdir(parents=True, exist_ok=True)
    model = make_model(root / "tiny-llama")
    good = make_adapter(model, root / "good", seed=1)
    out = {
        "model": model,
        "good": good,
        "good2": make_adapter(model, root / "good2", seed=2),
        "nan": make_nan(good, root / "nan"),
        "wrong_shape": make_wrong_shape(good, root / "wrong_shape"),
        "planted": make_planted(model, good, root / "planted"),
    }
    (root / "manifest.json").write_text(json.dumps({k: str(v) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    import sys

    print(json.dumps({k: str(v) for k, v in make_all(Path(sys.argv[1])).items()}, indent=1))
