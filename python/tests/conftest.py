"""Shared fixtures: the real MiniLM base, the committed fixture adapters, and the CLI as the
independent reference every Python report is compared with.

Exactness: the CLI and the extension run the same library code on the same bytes, so every
number of a module report (singular values, max |cos|, outside-span norms, intruders, ties,
solver) must be equal as float64, not merely close. Only what describes the run differs and is
left out: timings, where the base spectrum came from, the base's label, the adapter's name and
why CUDA was not used (which CUDA libraries a process can load changes once torch is imported).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "minilm"
ADAPTERS = ["lora_r2", "lora_r16_qv", "rslora_r16"]


def skip_or_fail(reason: str):
    """Skips with the reason printed; under INTRUDER_GATE_REQUIRE_ALL (CI) it is a failure."""
    print(f"SKIP: {reason}")
    if os.environ.get("INTRUDER_GATE_REQUIRE_ALL"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def minilm_base() -> Path:
    env = os.environ.get("INTRUDER_GATE_MINILM")
    if env:
        return Path(env)
    try:
        out = subprocess.run(
            ["bash", str(ROOT / "scripts" / "fetch-minilm.sh")],
            check=True, capture_output=True, text=True,
        )
    except subprocess.CalledProcessError as e:
        skip_or_fail(f"MiniLM base not available (scripts/fetch-minilm.sh: {e.stderr.strip()})")
    return Path(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def cli() -> Path:
    path = Path(os.environ.get("INTRUDER_GATE_CLI", ROOT / "target" / "release" / "intruder-gate"))
    if not path.is_file():
        skip_or_fail(f"CLI binary {path} missing (cargo build --release --bin intruder-gate)")
    return path


class Cli:
    def __init__(self, binary: Path):
        self.binary = binary
        self._scans: dict = {}

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.binary), *args], capture_output=True, text=True)

    def scan(self, base: Path, adapter: Path, *extra: str) -> dict:
        key = (str(base), str(adapter), extra)
        if key not in self._scans:
            p = self.run("scan", "--base", str(base), "--adapter", str(adapter), "--no-cache",
                         "--format", "json", *extra)
            assert p.returncode == 0, p.stderr
            self._scans[key] = json.loads(p.stdout)
        return self._scans[key]


@pytest.fixture(scope="session")
def ref(cli) -> Cli:
    return Cli(cli)


RUN_FIELDS = {"timings_ms", "base_spectrum"}


def numbers(report: dict) -> dict:
    """What must agree exactly between two screenings of the same adapter on the same base."""
    keep = {k: v for k, v in report.items()
            if k not in {"timings_ms", "base", "adapter", "backend_fallback"}}
    keep["modules"] = [{k: v for k, v in m.items() if k not in RUN_FIELDS} for m in report["modules"]]
    return keep


# --- a minimal safetensors reader / writer (numpy only, no extra dependency) --------------------

_NP = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            raw = np.frombuffer(body[begin:end], dtype="<u2").astype(np.uint32) << 16
            arr = raw.view(np.float32)  # bf16 widened exactly to f32
        else:
            arr = np.frombuffer(body[begin:end], dtype=_NP[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def write_safetensors(path: Path, tensors: dict[str, tuple[str, bytes, list[int]]]) -> None:
    """tensors: name -> (safetensors dtype, raw little-endian bytes, shape)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, raw, shape) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def adapter_modules(name: str) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """A fixture adapter as in-memory modules: module path -> (A, B, scale) from its own config."""
    d = FIXTURES / name
    cfg = json.loads((d / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / r**0.5 if cfg.get("use_rslora") else alpha / r
    w = read_safetensors(d / "adapter_model.safetensors")
    out = {}
    for key, a in w.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix("base_model.model.")
            out[module] = (a, w[key.replace("lora_A", "lora_B")], scale)
    return out


def base_matrices(base: Path) -> dict[str, np.ndarray]:
    """The base's 2-D float tensors."""
    return {k: v for k, v in read_safetensors(base).items() if v.ndim == 2 and v.dtype.kind == "f"}


def nan_adapter(tmp_path: Path) -> Path:
    """lora_r2 with one NaN in a lora_B: malformed, so the default policy rejects it."""
    d = tmp_path / "nan_lora"
    d.mkdir()
    (d / "adapter_config.json").write_text((FIXTURES / "lora_r2" / "adapter_config.json").read_text())
    w = read_safetensors(FIXTURES / "lora_r2" / "adapter_model.safetensors")
    key = sorted(k for k in w if k.endswith("lora_B.weight"))[0]
    w[key][0, 0] = np.nan
    write_safetensors(d / "adapter_model.safetensors",
                      {k: ("F32", v.astype("<f4").tobytes(), list(v.shape)) for k, v in w.items()})
    return d
