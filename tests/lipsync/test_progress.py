"""Streamed progress: every report in order, a repeat while a stage runs long, an ETA, never 1.0."""

from __future__ import annotations

import threading

import pytest

from lipsync.progress import LAST_BEFORE_DONE, EtaEstimate, ProgressReport, ProgressReporter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_report_arrives_in_order_below_one_before_the_context_is_left() -> None:
    sent: list[ProgressReport] = []
    with ProgressReporter(sent.append, heartbeat_s=60) as progress:
        for step in range(50):
            progress(0.2 + step / 100, "generate")
        progress(1.0, "encode")
    assert [report.fraction for report in sent] == [0.2 + step / 100 for step in range(50)] + [LAST_BEFORE_DONE]
    assert sent[-1].stage == "encode"


def test_a_quiet_stage_repeats_its_last_report() -> None:
    sent: list[ProgressReport] = []
    repeated = threading.Event()

    def sink(report: ProgressReport) -> None:
        sent.append(report)
        if len(sent) >= 3:
            repeated.set()

    with ProgressReporter(sink, heartbeat_s=0.05) as progress:
        progress(0.5, "generate")
        assert repeated.wait(30)
    assert {(report.fraction, report.stage) for report in sent} == {(0.5, "generate")}


def test_the_eta_follows_the_generation_rate_once_generation_moved() -> None:
    clock = Clock()
    eta = EtaEstimate(clock=clock)
    assert eta(0.0, "audio") is None
    clock.now += 10
    assert eta(0.2, "analyse") == pytest.approx(40.0)  # 0.2 in 10 s: 0.8 left at the same rate
    assert eta(0.2, "generate") == pytest.approx(40.0)  # generation has not moved yet: still the overall rate
    clock.now += 10
    assert eta(0.6, "generate") == pytest.approx(10.0)  # 0.4 in 10 s since generation started: 0.4 left
