"""Screen and clamp a loaded PEFT model in memory, without writing any file.

Base weights come from each LoRA layer's ``base_layer.weight`` (borrowed without a copy when on
the CPU), A, B and the scaling from the layer itself, so rsLoRA, ``rank_pattern`` and
``alpha_pattern`` need no special handling. Only ``Linear`` LoRA layers are supported; DoRA,
embedding and convolution layers raise :class:`UnsupportedError`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from . import ClampedAdapter, Gate, InvalidArgumentError, Report, UnsupportedError

_PREFIX = "base_model.model."

__all__ = ["screen_model", "clamp_model"]


def _lora_layers(peft_model: Any, adapter_name: str):
    """(module path without the PEFT prefix, layer) for each LoRA layer carrying the adapter."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, layer in peft_model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in getattr(layer, "lora_embedding_A", {}):
            raise UnsupportedError(f"{name}: LoRA on embeddings is not supported")
        if adapter_name not in layer.lora_A:
            continue
        if getattr(layer, "use_dora", {}).get(adapter_name, False):
            raise UnsupportedError(f"{name}: DoRA adapters are not supported yet")
        if layer.lora_A[adapter_name].weight.dim() != 2:
            raise UnsupportedError(f"{name}: only Linear LoRA layers are supported")
        found.append((name[len(_PREFIX):] if name.startswith(_PREFIX) else name, layer))
    if not found:
        raise InvalidArgumentError(f"the model has no LoRA layer with adapter '{adapter_name}'")
    return found


def screen_model(
    peft_model: Any, adapter_name: str = "default", gate: Gate | None = None, **gate_kwargs: Any
) -> Report:
    """Screens adapter ``adapter_name`` of a loaded ``PeftModel``.

    The base weights are attached to ``gate`` (a new ``Gate(**gate_kwargs)`` when None) under
    ``<module path>.weight``, once per gate: the gate keeps them alive and reads them as they are
    then, so do not modify the base weights in place (e.g. merge) while the gate is used. Clamp
    the report with :func:`clamp_model`, or with ``report._gate.clamp(report)``.
    """
    if gate is None:
        gate = Gate(**gate_kwargs)
    elif gate_kwargs:
        raise InvalidArgumentError("pass either a gate or Gate keyword arguments, not both")
    layers = _lora_layers(peft_model, adapter_name)
    fan_in_fan_out = {bool(getattr(layer, "fan_in_fan_out", False)) for _, layer in layers}
    if len(fan_in_fan_out) > 1:
        raise UnsupportedError("layers disagree on fan_in_fan_out; screen them separately")
    attached = set(gate._host_tensor_names())
    base = {}
    modules = {}
    for name, layer in layers:
        tensor = name + ".weight"
        if tensor not in attached:
            base[tensor] = layer.get_base_layer().weight
        modules[name] = (
            layer.lora_A[adapter_name].weight,
            layer.lora_B[adapter_name].weight,
            float(layer.scaling[adapter_name]),
        )
    gate.attach_base_tensors(base)
    return gate.screen(modules, name=adapter_name, fan_in_fan_out=fan_in_fan_out.pop())


def clamp_model(
    peft_model: Any,
    adapter_name: str = "default",
    new_adapter_name: str = "intruder_clamped",
    lam: float = 0.75,
    target: str = "all",
    mode: str = "exact",
    report: Report | None = None,
    **gate_kwargs: Any,
) -> ClampedAdapter:
    """Adds adapter ``new_adapter_name``: ``adapter_name`` with its intruders' singular values
    scaled by ``lam``, and makes it the active adapter (as PEFT's ``reduce_intruder_dimension``).

    ``mode="exact"`` (default) gives each module rank r + m (m = its clamped directions), so
    nothing but the intruders changes; ``"rank-preserving"`` keeps rank r, like PEFT. The new
    adapter has scale 1 in every module (the old scale is folded into B). ``report`` is a
    :func:`screen_model` report of this adapter (screened now when None). Returns the clamp.
    """
    if report is None:
        report = screen_model(peft_model, adapter_name, **gate_kwargs)
    elif gate_kwargs:
        raise InvalidArgumentError("Gate keyword arguments only apply when report is None")
    if new_adapter_name in peft_model.peft_config:
        raise InvalidArgumentError(f"the model already has an adapter '{new_adapter_name}'")
    clamped = report._gate.clamp(report, lam=lam, target=target, mode=mode)
    layers = dict(_lora_layers(peft_model, adapter_name))
    if set(layers) != set(clamped.ranks):
        raise InvalidArgumentError(
            "the report does not describe this model's adapter "
            f"(modules {sorted(set(clamped.ranks) ^ set(layers))} differ)"
        )

    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    top = clamped.rank
    config.r = top
    config.lora_alpha = top
    config.use_rslora = False
    # Scale 1 everywhere: alpha = rank per module; exact-name patterns for the other ranks.
    pattern = {re.escape(n): r for n, r in clamped.ranks.items() if r != top}
    config.rank_pattern = dict(pattern)
    config.alpha_pattern = dict(pattern)
    config.inference_mode = True
    peft_model.add_adapter(new_adapter_name, config)

    for name, (a, b) in clamped.as_torch().items():
        layer = layers[name]
        new_a = layer.lora_A[new_adapter_name].weight
        new_b = layer.lora_B[new_adapter_name].weight
        if tuple(new_a.shape) != tuple(a.shape) or tuple(new_b.shape) != tuple(b.shape):
            raise InvalidArgumentError(
                f"{name}: PEFT built the new adapter with lora_A {tuple(new_a.shape)} / lora_B "
                f"{tuple(new_b.shape)}, the clamp needs {tuple(a.shape)} / {tuple(b.shape)}"
            )
        if abs(float(layer.scaling[new_adapter_name]) - 1.0) > 1e-12:
            raise InvalidArgumentError(f"{name}: new adapter scale is not 1")
        old = layer.lora_A[adapter_name].weight
        new_a.data = a.to(dtype=old.dtype, device=old.device)
        new_b.data = b.to(dtype=old.dtype, device=old.device)
    peft_model.set_adapter(new_adapter_name)
    return clamped
