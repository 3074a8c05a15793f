"""sdd.progress: the plain lines a log gets when stdout is not a terminal (issue 14)."""

from __future__ import annotations

import io
import re

from sdd.progress import StageProgress, duration, plain_line


def test_plain_line_format():
    line = plain_line("sft-teacher", "step", 120, 350, {"loss": 0.41234, "mean_token_accuracy": 0.7}, 65.2, 125.0)
    assert line == "sft-teacher: step 120/350 (34%)  loss 0.4123  mean_token_accuracy 0.7  elapsed 1m05s  eta 2m05s"
    assert plain_line("eval", "completions", 5, None, {}, 3.0, None) == "eval: completions 5  elapsed 3s"


def test_duration():
    assert [duration(s) for s in (0, 42.4, 65, 3600, 3725, 90061)] == ["0s", "42s", "1m05s", "1h00m", "1h02m", "25h01m"]


def test_a_log_gets_a_flushed_line_every_n_steps_with_the_headline_metrics():
    out = io.StringIO()  # not a terminal, like a Slurm log
    progress = StageProgress("distill", 12, headline=("loss", "reverse_kl", "completions/clipped_ratio"),
                             every_steps=5, every_s=3600, stream=out).start()
    assert progress.plain
    for step in range(1, 13):  # as the trainer callback does: the metrics logged at a step, then the step
        progress.log({"loss": 1.0 / step, "reverse_kl": 0.5, "grad_norm": 3.0, "completions/clipped_ratio": 0.25})
        progress.update(step)
    progress.stop()
    lines = out.getvalue().splitlines()
    assert [re.match(r"distill: step (\d+)/12", line)[1] for line in lines] == ["5", "10", "12"]  # 12: where it ended
    assert "loss 0.1  reverse_kl 0.5  clipped_ratio 0.25" in lines[1]  # step 10's values, by their last name
    assert "grad_norm" not in out.getvalue()  # only the stage's headline keys
    assert all(re.search(r"  elapsed \d+s  eta \d+s$", line) for line in lines)


def test_a_line_every_s_seconds_even_between_step_multiples():
    out = io.StringIO()
    progress = StageProgress("teacher sampling", 1000, unit="completions", every_steps=500, every_s=0, stream=out).start()
    for _ in range(3):
        progress.advance(8)
    progress.stop()
    assert out.getvalue().splitlines() == [
        line for line in out.getvalue().splitlines() if line.startswith("teacher sampling: completions ")]
    assert [line.split()[3] for line in out.getvalue().splitlines()] == ["8/1000", "16/1000", "24/1000"]


def test_a_resumed_stage_counts_its_eta_from_its_own_steps():
    out = io.StringIO()
    progress = StageProgress("sft", 100, completed=90, every_steps=1, stream=out).start()
    progress.update(91)
    assert "sft: step 91/100 (91%)" in out.getvalue()
    assert progress.eta(progress.started + 2.0) == 18.0  # 2 s for 1 step of this run, 9 left


def test_a_terminal_gets_the_bar_and_no_lines():
    out = io.StringIO()
    progress = StageProgress("sft", 10, stream=out, plain=False, every_steps=1).start()
    progress.update(5)
    progress.log({"loss": 0.5})
    progress.stop()
    assert "sft: step" not in out.getvalue()
