"""Streamed progress: every report in order, a repeat while a stage runs long, never 1.0; an ETA from learned stage rates."""

from __future__ import annotations

import threading

import pytest

from lipsync.progress import (
    LAST_BEFORE_DONE,
    STAGE_SPANS,
    EtaEstimate,
    JobSize,
    ProgressReport,
    ProgressReporter,
    StageRates,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_report_arrives_in_order_below_one_before_the_context_is_left() -> None:
    sent: list[ProgressReport] = []
    with ProgressReporter(sent.append, heartbeat_s=60, eta=EtaEstimate(StageRates(8))) as progress:
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

    with ProgressReporter(sink, heartbeat_s=0.05, eta=EtaEstimate(StageRates(8))) as progress:
        progress(0.5, "generate")
        assert repeated.wait(30)
    assert {(report.fraction, report.stage) for report in sent} == {(0.5, "generate")}


def run_job(eta: EtaEstimate, clock: Clock, durations: dict[str, float]) -> None:
    """Feed ``eta`` one job's reports: each stage's first report, then the stage's time passes."""
    for stage, seconds in durations.items():
        eta(STAGE_SPANS[stage][0], stage)
        clock.now += seconds
    eta.finish()


def test_a_server_that_never_finished_a_job_tells_no_eta_before_generation_moved() -> None:
    clock = Clock()
    eta = EtaEstimate(StageRates(8), clock=clock)
    eta.plan(JobSize(frames=100, steps=20))
    assert eta(0.0, "audio") is None
    clock.now += 10
    assert eta(0.2, "analyse") is None  # how fast this server generates is not known yet
    assert eta(0.2, "generate") is None  # generation has not moved yet
    clock.now += 10
    # generation: 0.4 of the scale (half the stage) in 10 s, 10 s more; encoding at the job's overall
    # pace: 20 s for 0.6 of the scale, so 0.05 of it takes 5/3 s
    assert eta(0.575, "generate") == pytest.approx(10.0 + 20 / 0.575 * 0.05)


def test_generation_pace_counts_from_its_first_report_which_comes_after_the_first_step() -> None:
    clock = Clock()
    eta = EtaEstimate(StageRates(8), clock=clock)
    eta.plan(JobSize(frames=100, steps=20))
    eta(0.2 + 0.75 * 0.1, "generate")  # one step of ten done, its time unknown
    clock.now += 10
    # one more step in 10 s: 8 steps left take 80 s (not 40 s, as counting both steps in 10 s would say)
    assert eta(0.2 + 0.75 * 0.2, "generate") == pytest.approx(80.0 + 10 / (0.2 + 0.75 * 0.2) * 0.05)


def test_a_repeated_report_spends_time_on_the_step_in_progress_rather_than_slowing_the_pace() -> None:
    clock = Clock()
    eta = EtaEstimate(StageRates(8), clock=clock)
    eta.plan(JobSize(frames=100, steps=20))
    eta(0.2, "generate")
    clock.now += 10
    first = eta(0.2 + 0.75 * 0.5, "generate")  # half the stage in 10 s: 10 s more, plus encoding
    clock.now += 4
    # a heartbeat 4 s later: 4 s less of generation (encoding, at the job's overall pace, a little more)
    assert eta(0.2 + 0.75 * 0.5, "generate") == pytest.approx(first - 4 + 4 / 0.575 * 0.05)


def test_a_finished_job_teaches_the_next_one_per_frame_and_step() -> None:
    clock = Clock()
    rates = StageRates(8)
    first = EtaEstimate(rates, clock=clock)
    first.plan(JobSize(frames=100, steps=20))
    run_job(first, clock, {"audio": 1.0, "analyse": 4.0, "generate": 40.0, "encode": 2.0})

    second = EtaEstimate(rates, clock=clock)
    second.plan(JobSize(frames=200, steps=10))  # twice the frames (audio, analysis, encoding), as many frame-steps
    assert second(0.0, "audio") == pytest.approx(2.0 + 8.0 + 40.0 + 4.0)
    clock.now += 1.5
    assert second(0.05, "analyse") == pytest.approx(8.0 + 40.0 + 4.0)
    clock.now += 6.0
    assert second(0.125, "analyse") == pytest.approx(2.0 + 40.0 + 4.0)  # learned time left, not the fraction's
    clock.now += 20.0  # analysis overran: its learned remainder is spent
    assert second(0.2, "analyse") == pytest.approx(40.0 + 4.0)


def test_generation_trusts_its_own_pace_more_as_it_proceeds() -> None:
    clock = Clock()
    rates = StageRates(8)
    first = EtaEstimate(rates, clock=clock)
    first.plan(JobSize(frames=100, steps=20))
    run_job(first, clock, {"audio": 1.0, "analyse": 4.0, "generate": 40.0, "encode": 2.0})

    second = EtaEstimate(rates, clock=clock)
    second.plan(JobSize(frames=100, steps=20))
    second(0.0, "audio")
    second(0.2, "generate")
    clock.now += 20.0  # a quarter of generation in 20 s: this server is twice as slow now
    own, learned = 60.0, 20.0
    assert second(0.2 + 0.75 / 4, "generate") == pytest.approx(own / 16 + learned * 15 / 16 + 2.0)
    clock.now += 60.0
    assert second(0.2 + 0.75 * 0.9, "generate") == pytest.approx(0.81 * 80 / 9 + 0.19 * 0.0 + 2.0)


def test_stage_times_are_a_fixed_cost_plus_a_cost_per_unit_over_the_last_jobs() -> None:
    rates = StageRates(3)
    small, large = JobSize(frames=10, steps=2), JobSize(frames=30, steps=2)
    rates.learn({"generate": 99.0}, JobSize(frames=50, steps=2))  # pushed out by the three after it
    rates.learn({"encode": 3.0, "generate": 25.0}, small)
    rates.learn({"encode": 5.0, "generate": 65.0}, large)
    rates.learn({"encode": 3.0, "generate": 25.0}, small)
    # generate: 5 s + 1 s per frame-step; encode: 2 s + 0.1 s per frame
    assert rates.seconds("generate", JobSize(frames=20, steps=2)) == pytest.approx(5.0 + 1.0 * 40)
    assert rates.seconds("encode", JobSize(frames=100, steps=2)) == pytest.approx(2.0 + 0.1 * 100)
    assert rates.seconds("audio", small) is None


def test_jobs_of_one_size_scale_in_proportion() -> None:
    rates = StageRates(8)
    rates.learn({"generate": 25.0}, JobSize(frames=10, steps=2))
    assert rates.seconds("generate", JobSize(frames=30, steps=2)) == pytest.approx(75.0)


def test_a_stage_that_does_not_grow_with_size_takes_its_typical_time() -> None:
    rates = StageRates(8)
    rates.learn({"audio": 2.0}, JobSize(frames=10, steps=2))
    rates.learn({"audio": 1.0}, JobSize(frames=30, steps=2))
    assert rates.seconds("audio", JobSize(frames=90, steps=2)) == pytest.approx(1.5)


def test_only_a_job_that_succeeded_teaches_the_rates() -> None:
    clock = Clock()
    rates = StageRates(8)
    size = JobSize(frames=100, steps=20)
    with pytest.raises(RuntimeError):
        with ProgressReporter(lambda report: None, 60, EtaEstimate(rates, clock=clock)) as progress:
            progress.plan(size)
            progress(0.0, "audio")
            raise RuntimeError("the job failed")
    assert rates.seconds("audio", size) is None
    with ProgressReporter(lambda report: None, 60, EtaEstimate(rates, clock=clock)) as progress:
        progress.plan(size)
        progress(0.0, "audio")
    assert rates.seconds("audio", size) is not None
