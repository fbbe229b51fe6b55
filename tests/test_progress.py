"""Progress lines: their content on a terminal, how few lines a pipe gets, --quiet and --json,
and the comparison's own status in front of its methods' lines."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import metalstm
from metalstm import progress as pg
from metalstm.cli import main
from metalstm.compare import ComparisonProgress, configs
from metalstm.methods.metalearner.ablation import sgd_from_learned_init
from metalstm.progress import LiveLine, surrounding

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class FakeClock:
    """``time.perf_counter`` for metalstm.progress, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(pg, "time", SimpleNamespace(perf_counter=fake.perf_counter))
    return fake


def screens(text: str) -> list[str]:
    """What a terminal showed, in order: every rewrite of the line (erase codes removed)."""
    return [s.replace("\033[K", "") for s in text.replace("\n", "\r").split("\r") if s.strip()]


# -- the line itself -----------------------------------------------------------------------------
def test_a_pipe_gets_a_line_per_quarter_and_30_s_whichever_is_rarer(clock: FakeClock) -> None:
    out = io.StringIO()
    line = LiveLine(out, 1000)
    for done in range(1, 1001):
        clock.now += 1.0  # 1000 s in all: 30 s pass long before each quarter does
        line.update(done, lambda done=done: f"at {done}")
    assert out.getvalue().splitlines() == ["at 250", "at 500", "at 750", "at 1000"]

    out = io.StringIO()
    line = LiveLine(out, 1000)
    for done in range(1, 1001):
        clock.now += 0.02  # 20 s in all: no quarter is ever 30 s after the previous line
        line.update(done, lambda done=done: f"at {done}")
    assert out.getvalue().splitlines() == ["at 1000"]  # only the end

    out = io.StringIO()
    line = LiveLine(out, 10)
    for done in range(1, 11):
        clock.now += 100.0  # slow units: the quarter rule keeps it to a few lines
        line.update(done, lambda done=done: f"at {done}")
    assert out.getvalue().splitlines() == ["at 3", "at 6", "at 9", "at 10"]


def test_a_terminal_line_is_rewritten_in_place_at_most_twice_a_second(clock: FakeClock) -> None:
    out = FakeTerminal()
    line = LiveLine(out, 100)
    for done in range(1, 101):
        clock.now += 0.25
        line.update(done, lambda done=done: f"at {done}")
    line.close()
    text = out.getvalue()
    assert text.startswith("\rat 1\033[K") and text.endswith("\rat 100\033[K\n")
    assert "\n" not in text[:-1]  # one line, rewritten
    shown = screens(text)
    assert shown == [f"at {n}" for n in [*range(1, 100, 2), 100]]


def test_the_time_left_then_the_time_taken(clock: FakeClock) -> None:
    line = LiveLine(None, 100)
    clock.now += 10.0
    line.update(25, str)
    assert line.rate() == pytest.approx(2.5) and line.timing() == "ETA 0m30s"
    clock.now += 3590.0
    line.update(100, str)
    assert line.timing() == "done in 1h00m"


# -- evaluate --------------------------------------------------------------------------------------
def test_evaluation_line_on_a_terminal_shows_episodes_rate_accuracy_ci_and_eta(
    data_env: Path,
) -> None:
    model, _ = metalstm.load_method("omniglot-5w1s")
    out = FakeTerminal()
    result = metalstm.evaluate(model, episodes=4, progress=out)
    shown = screens(out.getvalue())
    assert out.getvalue().endswith("\n")  # the line is ended before the result is printed
    number = r"\d+\.\d\d"
    first = rf"test episode 1/4 \| [\d.]+ episodes/s \| acc {number} % \| ETA \d+m\d\ds"
    assert re.fullmatch(first, shown[0]), shown[0]  # one episode: no interval yet
    last = shown[-1]
    end = rf"test episode 4/4 \| [\d.]+ episodes/s \| acc {number} ± {number} % \| done in "
    assert re.fullmatch(end + r"\d+m\d\ds", last), last
    # the running accuracy at the end is the result, with the same 95% CI formula
    assert f"acc {100 * result.mean:.2f} ± {100 * result.ci95:.2f} %" in last
    assert metalstm.evaluate(model, episodes=4).accuracies == result.accuracies


def test_evaluate_command_progress_on_stderr_quiet_and_json(
    data_env: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["evaluate", "--checkpoint", "omniglot-5w1s", "--episodes", "3"]
    assert main(argv) == 0  # not a terminal (captured): one line, at the end
    out, err = capsys.readouterr()
    assert re.fullmatch(r"test episode 3/3 \| .* \| done in \d+m\d\ds\n", err), err
    assert out.splitlines()[0].startswith("accuracy: ") and "episodes/s" not in out

    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*argv, "--quiet"]) == 0
    quiet_out = capsys.readouterr().out
    assert terminal.getvalue() == "" and quiet_out == out  # stdout unchanged

    assert main([*argv, "--json"]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed)["accuracy"] == pytest.approx(float(out.split()[1]) / 100, abs=1e-4)
    assert "\r" not in printed and "episodes/s" not in printed  # the JSON is only the JSON
    assert "test episode 3/3" in terminal.getvalue()  # progress went to stderr

    monkeypatch.setattr(sys, "stderr", terminal := FakeTerminal())
    assert main([*argv, "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(printed)
    assert terminal.getvalue() == ""


def test_sgd_ablation_shows_each_steps_validation(data_env: Path) -> None:
    model, _ = metalstm.load_method("omniglot-5w1s")
    out = FakeTerminal()
    ablation = sgd_from_learned_init(model, [0.1, 0.3], val_episodes=2, progress=out)
    finals = [s for s in screens(out.getvalue()) if "val episode 2/2" in s]
    assert [s.split(" | val episode")[0] for s in finals] == ["SGD lr 0.1", "SGD lr 0.3"]
    for line, lr in zip(finals, (0.1, 0.3), strict=True):
        assert f"acc {100 * ablation.validation[lr]:.2f} ± " in line


# -- compare ---------------------------------------------------------------------------------------
def test_comparison_status_leads_every_line_with_an_overall_eta(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(configs, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    planned = {
        ("protonet", "training"): 100,
        ("protonet", "evaluation"): 10,
        ("maml", "training"): 100,
        ("maml", "evaluation"): 10,
    }
    tracker = ComparisonProgress(["protonet", "maml"], planned)
    out = FakeTerminal()
    with tracker.stage("protonet", "training"):
        training = LiveLine(out, 50)  # the stage's main line: 50 updates of 2 episodes
        clock.now += 10.0
        training.update(25, lambda: "episode 50/100")
        validation = LiveLine(out, 4)  # a validation meanwhile: not the stage's measure
        validation.update(4, lambda: "validation episode 4/4")
    # 50 of 220 units in 10 s: this run needs 10 s more, the 120 units left 24 s at 0.2 s each
    assert screens(out.getvalue()) == [
        "method 1/2 (protonet) | comparison ETA ~0m34s | episode 50/100",
        "method 1/2 (protonet) | comparison ETA ~0m34s | validation episode 4/4",
    ]
    assert tracker.units_done == 50 and tracker.left == {
        ("protonet", "evaluation"): 10,
        ("maml", "training"): 100,
        ("maml", "evaluation"): 10,
    }
    with tracker.stage("maml", "evaluation"):
        line = LiveLine(out, 10)
        line.update(10, lambda: "test episode 10/10")
    assert screens(out.getvalue())[-1].startswith("method 2/2 (maml) | comparison ETA ~")
    outside = FakeTerminal()
    LiveLine(outside, 1).update(1, lambda: "alone")
    assert screens(outside.getvalue()) == ["alone"]  # no prefix outside a stage


def test_compare_command_shows_method_training_validation_and_test_progress(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    argv = ["compare", "--preset", "omniglot-5w1s", "--methods", "nn-pixel,protonet"]
    argv += ["--out", str(tmp_path / "cmp"), "--episodes", "3", "--train-episodes", "4"]
    argv += ["--set", "filters=4", "--set", "q_query=2", "--set", "val_episodes=2"]
    assert main(argv) == 0
    shown = screens(terminal.getvalue())
    prefix = r"method 2/2 \(protonet\) \| comparison ETA ~(\d+m\d\ds|\?) \| "
    assert any(re.match(prefix + r"episode \d/4 \| ", s) for s in shown), shown
    assert any(re.match(prefix + r"validation episode 2/2 \| ", s) for s in shown), shown
    for number, method in ((1, "nn-pixel"), (2, "protonet")):
        assert any(
            re.match(rf"method {number}/2 \({method}\) \| .* \| test episode 3/3 \| ", s)
            for s in shown
        ), shown
    assert "| Method | Accuracy (%) |" in capsys.readouterr().out

    monkeypatch.setattr(sys, "stderr", terminal := FakeTerminal())
    assert main([*argv, "--quiet"]) == 0
    assert terminal.getvalue() == ""


def test_no_prefix_leaks_out_of_a_block() -> None:
    with surrounding(lambda: "outer | "):
        inner = FakeTerminal()
        LiveLine(inner, 1).update(1, lambda: "x")
    after = FakeTerminal()
    LiveLine(after, 1).update(1, lambda: "y")
    assert screens(inner.getvalue()) == ["outer | x"] and screens(after.getvalue()) == ["y"]
