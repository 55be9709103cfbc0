"""Streamed progress: every report in order, a repeat while a stage runs long, never 1.0; an ETA from learned stage rates."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lipsync.config import ConfigError
from lipsync.progress import (
    LAST_BEFORE_DONE,
    STAGE_SPANS,
    STAGES,
    EtaEstimate,
    EtaSettings,
    JobSize,
    ProgressReport,
    ProgressReporter,
    StageRates,
)

IN_PROPORTION = dict.fromkeys(STAGES, 0.0)
REPO = Path(__file__).resolve().parents[2]
"""Fixed shares under which every stage scales in proportion with its units."""
SHARES = {"audio": 0.8, "analyse": 0.5, "generate": 0.0, "encode": 0.5}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_report_arrives_in_order_below_one_before_the_context_is_left() -> None:
    sent: list[ProgressReport] = []
    with ProgressReporter(sent.append, heartbeat_s=60, eta=EtaEstimate(StageRates(8, IN_PROPORTION))) as progress:
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

    with ProgressReporter(sink, heartbeat_s=0.05, eta=EtaEstimate(StageRates(8, IN_PROPORTION))) as progress:
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
    eta = EtaEstimate(StageRates(8, IN_PROPORTION), clock=clock)
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
    eta = EtaEstimate(StageRates(8, IN_PROPORTION), clock=clock)
    eta.plan(JobSize(frames=100, steps=20))
    eta(0.2 + 0.75 * 0.1, "generate")  # one step of ten done, its time unknown
    clock.now += 10
    # one more step in 10 s: 8 steps left take 80 s (not 40 s, as counting both steps in 10 s would say)
    assert eta(0.2 + 0.75 * 0.2, "generate") == pytest.approx(80.0 + 10 / (0.2 + 0.75 * 0.2) * 0.05)


def test_a_repeated_report_spends_time_on_the_step_in_progress_rather_than_slowing_the_pace() -> None:
    clock = Clock()
    eta = EtaEstimate(StageRates(8, IN_PROPORTION), clock=clock)
    eta.plan(JobSize(frames=100, steps=20))
    eta(0.2, "generate")
    clock.now += 10
    first = eta(0.2 + 0.75 * 0.5, "generate")  # half the stage in 10 s: 10 s more, plus encoding
    clock.now += 4
    # a heartbeat 4 s later: 4 s less of generation (encoding, at the job's overall pace, a little more)
    assert eta(0.2 + 0.75 * 0.5, "generate") == pytest.approx(first - 4 + 4 / 0.575 * 0.05)


def test_a_finished_job_teaches_the_next_one_per_frame_and_step() -> None:
    clock = Clock()
    rates = StageRates(8, IN_PROPORTION)
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


def test_generation_weighs_its_own_pace_by_the_share_of_the_stage_done() -> None:
    clock = Clock()
    rates = StageRates(8, IN_PROPORTION)
    first = EtaEstimate(rates, clock=clock)
    first.plan(JobSize(frames=100, steps=20))
    run_job(first, clock, {"audio": 1.0, "analyse": 4.0, "generate": 40.0, "encode": 2.0})

    second = EtaEstimate(rates, clock=clock)
    second.plan(JobSize(frames=100, steps=20))
    second(0.0, "audio")
    second(0.2, "generate")
    clock.now += 20.0  # a quarter of generation in 20 s: this server is twice as slow now
    own, learned = 60.0, 40.0 - 20.0
    assert second(0.2 + 0.75 / 4, "generate") == pytest.approx(own / 4 + learned * 3 / 4 + 2.0)
    clock.now += 60.0  # 0.9 of it in 80 s: the learned 40 s are spent, the own pace says 80 / 9 s more
    assert second(0.2 + 0.75 * 0.9, "generate") == pytest.approx(0.9 * 80 / 9 + 0.1 * 0.0 + 2.0)


def test_stage_times_are_a_fixed_cost_plus_a_cost_per_unit_over_the_last_jobs() -> None:
    rates = StageRates(3, SHARES)
    small, large = JobSize(frames=10, steps=2), JobSize(frames=30, steps=2)
    rates.learn({"encode": 9.0}, JobSize(frames=50, steps=2))  # pushed out by the three after it
    rates.learn({"encode": 3.0}, small)
    rates.learn({"encode": 5.0}, large)
    rates.learn({"encode": 3.0}, small)
    # 2 s + 0.1 s per frame
    assert rates.seconds("encode", JobSize(frames=100, steps=2)) == pytest.approx(2.0 + 0.1 * 100)
    assert rates.seconds("audio", small) is None


def test_generation_scales_in_proportion_even_where_drift_fits_a_fixed_cost() -> None:
    rates = StageRates(8, SHARES)
    # a CPU run's first three jobs (docs/bench/eta-cpu.json): the first, the smallest, ran slowest, so
    # least squares would say 50 s fixed + 0.074 s per frame-step and 199 s for 200 frames (it took 253 s)
    for frames, seconds in ((75, 109.8), (150, 163.5), (100, 118.5)):
        rates.learn({"generate": seconds}, JobSize(frames=frames, steps=10))
    per_unit = (109.8 * 750 + 163.5 * 1500 + 118.5 * 1000) / (750**2 + 1500**2 + 1000**2)
    assert rates.seconds("generate", JobSize(frames=200, steps=10)) == pytest.approx(per_unit * 2000)  # 234 s


def test_jobs_of_one_size_take_the_configured_share_of_a_stage_as_fixed() -> None:
    rates = StageRates(8, SHARES)
    rates.learn({"analyse": 8.0, "generate": 25.0}, JobSize(frames=10, steps=2))
    rates.learn({"analyse": 6.0, "generate": 25.0}, JobSize(frames=10, steps=2))
    size = JobSize(frames=30, steps=2)
    assert rates.seconds("analyse", size) == pytest.approx(7.0 * 0.5 + 7.0 * 0.5 * 3)
    assert rates.seconds("generate", size) == pytest.approx(75.0)  # share 0: in proportion


def test_a_stage_that_does_not_grow_with_size_takes_its_typical_time() -> None:
    rates = StageRates(8, SHARES)
    rates.learn({"audio": 2.0}, JobSize(frames=10, steps=2))
    rates.learn({"audio": 1.0}, JobSize(frames=30, steps=2))
    assert rates.seconds("audio", JobSize(frames=90, steps=2)) == pytest.approx(1.5)


def test_the_eta_settings_need_a_share_for_every_stage(tmp_path: Path) -> None:
    assert set(EtaSettings.load().fixed_share) == set(STAGES)
    config = tmp_path / "pipeline.yaml"
    config.write_text("eta:\n  history_jobs: 8\n  fixed_share: {audio: 0.8, analyse: 0.5, generate: 0.0}\n")
    with pytest.raises(ConfigError, match=r"fixed_share.*encode"):
        EtaSettings.load(config)
    config.write_text("eta:\n  history_jobs: 8\n  fixed_share: {audio: 1.5, analyse: 0.5, generate: 0, encode: 0}\n")
    with pytest.raises(ConfigError, match=r"fixed_share\.audio"):
        EtaSettings.load(config)


def test_only_a_job_that_succeeded_teaches_the_rates() -> None:
    clock = Clock()
    rates = StageRates(8, IN_PROPORTION)
    size = JobSize(frames=100, steps=20)
    with (
        pytest.raises(RuntimeError),
        ProgressReporter(lambda report: None, 60, EtaEstimate(rates, clock=clock)) as progress,
    ):
        progress.plan(size)
        progress(0.0, "audio")
        raise RuntimeError("the job failed")
    assert rates.seconds("audio", size) is None
    with ProgressReporter(lambda report: None, 60, EtaEstimate(rates, clock=clock)) as progress:
        progress.plan(size)
        progress(0.0, "audio")
    assert rates.seconds("audio", size) is not None


def test_rates_with_a_file_are_shared_by_every_instance_on_it(tmp_path: Path) -> None:
    path = tmp_path / "stage-rates.json"
    learner, reader = StageRates(8, IN_PROPORTION, path), StageRates(8, IN_PROPORTION, path)
    size = JobSize(frames=100, steps=20)
    assert reader.seconds("generate", size) is None
    learner.learn({"audio": 1.0, "generate": 40.0}, size)
    assert reader.seconds("generate", size) == pytest.approx(40.0)  # read again: the file changed
    reader.learn({"generate": 20.0}, size)
    assert learner.seconds("generate", size) == pytest.approx(30.0)  # both jobs, whichever instance learned them
    assert learner.seconds("audio", size) == reader.seconds("audio", size) == pytest.approx(1.0)


def test_a_restarted_server_starts_from_the_rates_its_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "stage-rates.json"
    clock = Clock()
    first = EtaEstimate(StageRates(8, IN_PROPORTION, path), clock=clock)
    first.plan(JobSize(frames=100, steps=20))
    run_job(first, clock, {"audio": 1.0, "analyse": 4.0, "generate": 40.0, "encode": 2.0})

    restarted = EtaEstimate(StageRates(8, IN_PROPORTION, path), clock=clock)
    restarted.plan(JobSize(frames=100, steps=20))
    assert restarted(0.0, "audio") == pytest.approx(1.0 + 4.0 + 40.0 + 2.0)


@pytest.mark.parametrize("content", ["", "{not json", '{"generate": [[100, "slow"]]}', '["generate"]'])
def test_a_missing_empty_or_malformed_file_holds_no_rates_and_is_replaced_by_the_next_job(
    tmp_path: Path, content: str
) -> None:
    path = tmp_path / "stage-rates.json"
    size = JobSize(frames=100, steps=20)
    assert StageRates(8, IN_PROPORTION, path).seconds("generate", size) is None
    path.write_text(content)
    rates = StageRates(8, IN_PROPORTION, path)
    assert rates.seconds("generate", size) is None
    rates.learn({"generate": 40.0}, size)
    assert StageRates(8, IN_PROPORTION, path).seconds("generate", size) == pytest.approx(40.0)


def test_a_file_that_cannot_be_written_keeps_the_job_in_memory(tmp_path: Path) -> None:
    (tmp_path / "not-a-folder").write_text("")
    rates = StageRates(8, IN_PROPORTION, tmp_path / "not-a-folder" / "stage-rates.json")
    size = JobSize(frames=100, steps=20)
    rates.learn({"generate": 40.0}, size)
    assert rates.seconds("generate", size) == pytest.approx(40.0)


LEARNER = """
import sys
from pathlib import Path
from lipsync.progress import STAGES, JobSize, StageRates

path, history, first_frames, jobs = Path(sys.argv[1]), *map(int, sys.argv[2:])
rates = StageRates(history, dict.fromkeys(STAGES, 0.0), path)
print("ready", flush=True)
sys.stdin.read(1)  # both start learning when both are ready
for frames in range(first_frames, first_frames + jobs):
    rates.learn({"audio": 1.0, "generate": 2.0}, JobSize(frames=frames, steps=1))
"""
"""A job process: learn ``jobs`` jobs into ``path``, one frame count each from ``first_frames`` on."""


def learn_in_two_processes(path: Path, history: int, jobs: int) -> None:
    """Two processes learning ``jobs`` jobs each into ``path`` at once (frames 1000… and 2000…).

    Fresh interpreters, not forks: a fork of this multi-threaded test process can inherit a lock that another
    thread held, and hang."""
    learners = [
        subprocess.Popen(
            [sys.executable, "-c", LEARNER, str(path), str(history), str(first), str(jobs)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for first in (1000, 2000)
    ]
    try:
        assert [learner.stdout.readline() for learner in learners] == ["ready\n"] * 2  # type: ignore[union-attr]
        for learner in learners:
            learner.stdin.write("go")  # type: ignore[union-attr]
            learner.stdin.close()  # type: ignore[union-attr]
        assert [learner.wait(timeout=120) for learner in learners] == [0, 0]
    finally:
        for learner in learners:
            learner.kill()


def test_processes_learning_at_once_lose_no_job(tmp_path: Path) -> None:
    path = tmp_path / "stage-rates.json"
    learn_in_two_processes(path, history=100, jobs=30)
    stored = json.loads(path.read_text())
    expected = {*range(1000, 1030), *range(2000, 2030)}
    assert sorted(units for units, _ in stored["audio"]) == sorted(expected)
    assert sorted(units for units, _ in stored["generate"]) == sorted(expected)


def test_the_file_keeps_the_newest_history_jobs_whichever_process_learned_them(tmp_path: Path) -> None:
    path = tmp_path / "stage-rates.json"
    learn_in_two_processes(path, history=5, jobs=20)
    stored = json.loads(path.read_text())
    assert {stage: len(samples) for stage, samples in stored.items()} == dict(audio=5, analyse=0, generate=5, encode=0)
    assert stored["audio"][-1][0] in {1019, 2019}  # the newest last: the last writer's last job
