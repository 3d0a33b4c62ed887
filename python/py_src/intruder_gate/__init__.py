"""intruder-gate: screen LoRA adapters for intruder dimensions before they are served.

    import intruder_gate as ig
    gate = ig.Gate("base/model.safetensors")
    report = gate.screen_adapter("my-adapter")
    if report.verdict == "clamp":
        gate.clamp(report).save_pretrained("my-adapter-clamped")

`intruder_gate.peft` screens and clamps a loaded PEFT model in memory; `intruder_gate.vllm` is
the vLLM plugin (entry point `intruder_gate` in `vllm.general_plugins`).
"""

import logging as _logging

from ._intruder_gate import (
    BaseMismatchError,
    ClampedAdapter,
    CudaError,
    FormatError,
    Gate,
    InternalError,
    IntruderGateError,
    InvalidArgumentError,
    IoError,
    LimitError,
    ModuleReport,
    NonFiniteError,
    Report,
    ShapeError,
    UnsupportedError,
    __version__,
    default_cache_dir,
)

# Warnings (e.g. a CUDA base tensor copied to the host) go to this logger.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "BaseMismatchError",
    "ClampedAdapter",
    "CudaError",
    "FormatError",
    "Gate",
    "InternalError",
    "IntruderGateError",
    "InvalidArgumentError",
    "IoError",
    "LimitError",
    "ModuleReport",
    "NonFiniteError",
    "Report",
    "ShapeError",
    "UnsupportedError",
    "__version__",
    "default_cache_dir",
]
