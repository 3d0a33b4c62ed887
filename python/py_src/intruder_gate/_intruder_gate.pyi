"""Type stubs of the compiled extension (re-exported by ``intruder_gate``)."""

import os
from pathlib import Path
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

__version__: str

StrPath = str | os.PathLike[str]
# A 2-D numpy array (float32/float16/float64) or torch tensor (float32/float16/bfloat16/float64).
Tensor = Any
Verdict = Literal["accept", "warn", "clamp", "reject"]

def default_cache_dir() -> Path | None:
    """The library's default disk cache directory (``Gate(cache_dir=...)`` when omitted)."""

class IntruderGateError(Exception):
    """Base of every error the library raises; ``kind`` is the library's error kind label."""

    kind: ClassVar[str | None]

class InvalidArgumentError(IntruderGateError): ...
class IoError(IntruderGateError): ...
class FormatError(IntruderGateError): ...
class ShapeError(IntruderGateError): ...
class NonFiniteError(IntruderGateError): ...
class UnsupportedError(IntruderGateError): ...
class BaseMismatchError(IntruderGateError): ...
class LimitError(IntruderGateError): ...
class CudaError(IntruderGateError): ...
class InternalError(IntruderGateError): ...

class ModuleReport:
    """One screened matrix: the fields of the JSON report's ``modules[i]``."""

    module: str
    base_tensor: str
    shape: tuple[int, int]
    rank: int
    scale: float
    singular_values: list[float]
    max_cos: list[float]
    intruders: list[int]
    tied: list[int]
    outside_base_span: list[float]
    near_epsilon: list[int]
    solver: str
    base_spectrum: str
    timings_ms: dict[str, float]
    detected_rank: int | None
    low_rank_residual: float | None
    residual: float | None

class Report:
    """A screening report; ``to_json()`` is the CLI's ``scan --format json``."""

    @property
    def verdict(self) -> Verdict: ...
    @property
    def total_intruders(self) -> int: ...
    @property
    def modules_with_intruders(self) -> int: ...
    @property
    def modules(self) -> list[ModuleReport]: ...
    @property
    def fired_rules(self) -> list[dict[str, Any]]: ...
    @property
    def error(self) -> dict[str, str] | None:
        """``{"kind", "message"}`` when a malformed adapter was rejected."""
    @property
    def warnings(self) -> list[str]: ...
    @property
    def adapter(self) -> str | None: ...
    @property
    def base(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def top_k(self) -> int: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def schema_version(self) -> int: ...
    @property
    def seed(self) -> int | None:
        """The randomized solver's sketch seed, when any module used it."""
    @property
    def unchanged(self) -> list[str]:
        """``screen_tuned``: the matrices byte-identical to the base (not screened)."""
    @property
    def timings_ms(self) -> dict[str, float]: ...
    @property
    def _gate(self) -> Gate: ...
    def to_json(self) -> str: ...
    def to_dict(self) -> dict[str, Any]: ...

class ClampedAdapter:
    """The clamped adapter: ``ΔW'' = B·A`` per module, scale 1."""

    @property
    def modules(self) -> dict[str, tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]:
        """Module → (lora_A [rank, in], lora_B [out, rank]), float32 copies."""
    def as_torch(
        self, dtype: Any = None, device: Any = None
    ) -> dict[str, tuple[Any, Any]]: ...
    @property
    def ranks(self) -> dict[str, int]: ...
    @property
    def rank(self) -> int: ...
    @property
    def clamped_directions(self) -> int: ...
    @property
    def fan_in_fan_out(self) -> bool: ...
    def to_dict(self) -> dict[str, Any]: ...
    def save_pretrained(
        self, directory: StrPath, dtype: Literal["float32", "float16", "bfloat16"] | None = None
    ) -> None:
        """Writes a PEFT adapter directory atomically."""

class Gate:
    """A base model, a base-spectrum cache and a backend; screens adapters from any thread.

    ``cache_dir`` omitted: the library's default directory; ``None``: no disk cache.
    ``threads=None``: one worker per core. ``method``: the CLI's ``--method`` ("auto" is what
    ``screen_tuned`` should use; "dense" is the float64 reference). ``seed``: of the randomized
    solver's sketches (``screen_tuned``, DoRA modules); the same input and seed give the same
    report. Base tensors attached from memory are borrowed:
    the gate keeps them alive and they must not be modified while it lives.
    """

    def __init__(
        self,
        base: StrPath | Mapping[str, Tensor] | None = None,
        *,
        top_k: int = 10,
        epsilon: float = 0.5,
        policy: Mapping[str, Any] | StrPath | None = None,
        cache_dir: StrPath | None = ...,
        backend: Literal["auto", "cpu", "cuda"] = "auto",
        threads: int | None = None,
        method: Literal["brand", "dense", "auto"] = "brand",
        seed: int | None = None,
    ) -> None: ...
    @property
    def backend(self) -> Literal["cpu", "cuda"]: ...
    @property
    def method(self) -> Literal["brand", "dense", "auto"]: ...
    @property
    def seed(self) -> int: ...
    @property
    def top_k(self) -> int: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def cache_dir(self) -> Path | None: ...
    def attach_base(self, path: StrPath) -> None: ...
    def attach_base_tensors(self, tensors: Mapping[str, Tensor]) -> None: ...
    def screen_adapter(self, directory: StrPath) -> Report: ...
    def screen_tuned(self, path: StrPath) -> Report:
        """A fully fine-tuned or merged checkpoint against the base (``scan --tuned``)."""
    def screen(
        self,
        modules: Mapping[str, tuple[Tensor, Tensor, float]],
        name: str = "in-memory",
        *,
        fan_in_fan_out: bool = False,
    ) -> Report: ...
    def clamp(
        self,
        report: Report,
        lam: float = 0.75,
        target: Literal["all", "top1"] = "all",
        mode: Literal["exact", "rank-preserving"] = "exact",
        pad_rank_to: int = 0,
    ) -> ClampedAdapter: ...
    def metrics(self) -> str: ...
    def on_event(self, callback: Callable[[dict[str, Any]], object] | None) -> None:
        """The callback must not call ``on_event`` itself."""
    def _host_tensor_names(self) -> list[str]: ...
