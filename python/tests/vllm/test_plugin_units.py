"""The plugin's worker-side logic without a server: snapshot store, audit mode, clamp fitting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    import vllm  # noqa: F401  (PEFTHelper, which the worker side calls)
except ImportError as e:
    pytest.skip(
        f"vLLM is not installed here ({e}); run scripts/vllm-e2e.sh", allow_module_level=True
    )

import sys

from intruder_gate import vllm as plugin

sys.path.insert(0, str(Path(__file__).parent))
import fixtures


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("units")
    model = fixtures.make_model(root / "tiny-llama")
    good = fixtures.make_adapter(model, root / "good", seed=1)
    return {
        "root": root,
        "model": model,
        "good": good,
        "nan": fixtures.make_nan(good, root / "nan"),
        "planted": fixtures.make_planted(model, good, root / "planted"),
    }


def worker(tmp_path: Path, fx, mode="enforce", max_rank=16):
    settings = plugin.Settings(
        mode=mode, policy=None, lam=0.75, cache_dir=tmp_path / "cache", base=None,
        snapshot_max_bytes=1 << 30,
    )  # fmt: skip
    manager = SimpleNamespace(
        max_position_embeddings=256,
        lora_config=SimpleNamespace(max_lora_rank=max_rank),
        _intruder_gate_base=str(fx["model"]),
    )
    return plugin.WorkerGate(settings), manager


def test_enforce_rejects_naming_the_clients_path(tmp_path, fx):
    wg, manager = worker(tmp_path, fx)
    with pytest.raises(plugin.AdapterRejected) as e:
        wg.prepare(manager, SimpleNamespace(lora_name="n"), str(fx["nan"]))
    message = str(e.value)
    assert message.startswith("intruder-gate rejected adapter 'n': invalid adapter (non_finite): ")
    assert str(fx["nan"]) in message and "snapshots" not in message


def test_audit_mode_loads_the_unchanged_snapshot(tmp_path, fx):
    wg, manager = worker(tmp_path, fx, mode="audit")
    for name in ("nan", "planted"):
        prepared = wg.prepare(manager, SimpleNamespace(lora_name=name), str(fx[name]))
        for f in plugin.ADAPTER_FILES:
            assert (Path(prepared.path) / f).read_bytes() == (fx[name] / f).read_bytes()
    assert prepared.verdict == "clamp"


@pytest.mark.parametrize("max_rank, mode", [(16, "exact"), (8, "rank-preserving")])
def test_clamp_fits_max_lora_rank(tmp_path, fx, max_rank, mode):
    wg, manager = worker(tmp_path, fx, max_rank=max_rank)
    prepared = wg.prepare(manager, SimpleNamespace(lora_name="p"), str(fx["planted"]))
    assert prepared.verdict == "clamp"
    assert Path(prepared.path).name == f"clamped-{mode}-lambda0.75"
    rank = json.loads((Path(prepared.path) / "adapter_config.json").read_text())["r"]
    # exact: r + 1 (one intruder per clamped module); rank-preserving keeps r.
    assert rank == (fixtures.RANK + 1 if mode == "exact" else fixtures.RANK)
    assert rank <= max_rank


def test_snapshots_are_content_addressed(tmp_path, fx):
    store = plugin.SnapshotStore(tmp_path / "s", 1 << 30)
    copy = tmp_path / "copy"
    shutil.copytree(fx["good"], copy)
    d1, p1 = store.snapshot(str(fx["good"]))
    d2, p2 = store.snapshot(str(copy))
    assert (d1, p1) == (d2, p2)
    data = bytearray((copy / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "adapter_model.safetensors").write_bytes(bytes(data))
    d3, p3 = store.snapshot(str(copy))
    assert d3 != d1 and (p3 / "adapter_model.safetensors").read_bytes() == bytes(data)
    assert (p1 / "adapter_model.safetensors").read_bytes() == (
        fx["good"] / "adapter_model.safetensors"
    ).read_bytes()


def test_prune_never_deletes_a_snapshot_someone_serves(tmp_path, fx):
    root = tmp_path / "s"
    other = plugin.SnapshotStore(root, 0)  # stands for another process: its own lock fds
    _, px = other.snapshot(str(fx["good"]))
    mine = plugin.SnapshotStore(root, 0)  # bound 0: prune everything prunable
    _, py = mine.snapshot(str(fx["nan"]))
    assert px.exists() and py.exists()  # x is held by `other`, y by `mine`
    other.close()
    _, pz = mine.snapshot(str(fx["planted"]))
    assert not px.exists()  # released and least recently used: pruned
    assert py.exists() and pz.exists()
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no leftovers
