"""One exception per library error kind, picklable, carrying the library's own message."""

from __future__ import annotations

import pickle

import pytest

import intruder_gate as ig
from conftest import FIXTURES

KINDS = {
    ig.InvalidArgumentError: "invalid_argument",
    ig.IoError: "io",
    ig.FormatError: "format",
    ig.ShapeError: "shape",
    ig.NonFiniteError: "non_finite",
    ig.UnsupportedError: "unsupported",
    ig.BaseMismatchError: "base_mismatch",
    ig.LimitError: "limit",
    ig.CudaError: "cuda",
    ig.InternalError: "internal",
}


@pytest.mark.parametrize("cls", list(KINDS))
def test_hierarchy_and_pickle(cls):
    assert issubclass(cls, ig.IntruderGateError) and issubclass(cls, Exception)
    assert cls.kind == KINDS[cls]
    err = cls("module x: something went wrong")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and str(back) == str(err) and back.args == err.args


def test_pickle_of_a_raised_error():
    with pytest.raises(ig.InvalidArgumentError) as e:
        ig.Gate(top_k=0, cache_dir=None)
    back = pickle.loads(pickle.dumps(e.value))
    assert type(back) is ig.InvalidArgumentError and str(back) == str(e.value)


@pytest.mark.parametrize(
    "kwargs, flag",
    [({"top_k": 0}, ["--top-k", "0"]), ({"top_k": 5000}, ["--top-k", "5000"]),
     ({"epsilon": 0.0}, ["--epsilon", "0"]), ({"epsilon": 1.5}, ["--epsilon", "1.5"])],
)
def test_config_validated_by_the_library(ref, minilm_base, kwargs, flag):
    """Same words as the CLI prints for the same setting: the message is the library's."""
    with pytest.raises(ig.InvalidArgumentError) as e:
        ig.Gate(cache_dir=None, **kwargs)
    p = ref.run("scan", "--base", str(minilm_base), "--adapter", str(FIXTURES / "lora_r2"),
                "--no-cache", *flag)
    assert p.returncode != 0
    assert str(e.value) in p.stderr


@pytest.mark.parametrize(
    "kwargs, match",
    [({"top_k": -1}, "top_k"), ({"threads": 0}, "threads"), ({"threads": -2}, "threads"),
     ({"backend": "tpu"}, "backend"), ({"policy": 3}, "policy")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ig.InvalidArgumentError, match=match):
        ig.Gate(cache_dir=None, **kwargs)


def test_io_errors_carry_the_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ig.IoError, match="nope.safetensors"):
        ig.Gate(missing, cache_dir=None)
    with pytest.raises(ig.IoError):
        ig.Gate(policy=tmp_path / "missing-policy.json", cache_dir=None)


def test_corrupt_base_is_a_format_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ig.FormatError):
        ig.Gate(bad, cache_dir=None)


def test_screening_without_a_base_is_an_invalid_argument():
    gate = ig.Gate(cache_dir=None)
    # A host that forgot attach_base made a programming error: it is raised, not turned into a
    # reject report that would blame the adapter.
    with pytest.raises(ig.InvalidArgumentError, match="no base attached"):
        gate.screen_adapter(FIXTURES / "lora_r2")


def test_cuda_backend_without_device_is_a_cuda_error():
    try:
        gate = ig.Gate(backend="cuda", cache_dir=None)
    except ig.CudaError as e:
        assert str(e)
    else:
        assert gate.backend == "cuda"


def test_cache_dir_default_and_off(tmp_path):
    assert ig.Gate().cache_dir is not None and ig.Gate().cache_dir == ig.default_cache_dir()
    assert ig.Gate(cache_dir=None).cache_dir is None
    assert str(ig.Gate(cache_dir=tmp_path).cache_dir) == str(tmp_path)
