"""Metrics text and the event hook."""

from __future__ import annotations

import sys

import pytest

import intruder_gate as ig
from conftest import FIXTURES


@pytest.fixture()
def gate(minilm_base):
    return ig.Gate(minilm_base, cache_dir=None)


def sample(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in metrics")


def test_metrics_count_screenings(gate):
    r1 = gate.screen_adapter(FIXTURES / "lora_r16_qv")
    r2 = gate.screen_adapter(FIXTURES / "lora_r2")
    text = gate.metrics()
    assert text.endswith("\n") and "# TYPE intruder_gate_screenings_total counter" in text
    total = sum(sample(text, f'intruder_gate_screenings_total{{verdict="{v}"}}')
                for v in ("accept", "warn", "clamp", "reject"))
    assert total == 2
    assert sample(text, "intruder_gate_intruder_dimensions_total") == (
        r1.total_intruders + r2.total_intruders)
    assert sample(text, "intruder_gate_modules_screened_total") == (
        len(r1.modules) + len(r2.modules))


def test_on_event_gets_a_dict_per_screening(gate):
    events = []
    gate.on_event(events.append)
    report = gate.screen_adapter(FIXTURES / "lora_r16_qv")
    assert events == [{
        "adapter": "lora_r16_qv",
        "outcome": report.verdict,
        "intruders": report.total_intruders,
        "modules": len(report.modules),
        "seconds": events[0]["seconds"],
    }]
    gate.on_event(None)
    gate.screen_adapter(FIXTURES / "lora_r2")
    assert len(events) == 1


def test_failing_callback_does_not_break_screening(gate, monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)

    def bad(event):
        raise RuntimeError("callback broke")

    gate.on_event(bad)
    report = gate.screen_adapter(FIXTURES / "lora_r2")
    assert report.verdict in {"accept", "warn", "clamp", "reject"}
    assert len(seen) == 1 and isinstance(seen[0].exc_value, RuntimeError)
    with pytest.raises(ig.InvalidArgumentError):
        gate.on_event(42)
