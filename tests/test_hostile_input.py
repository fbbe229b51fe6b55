"""Hostile checkpoints, settings and command lines: exit 0 or 2 with one line, no traceback,
nothing half-written, and no allocation beyond a bound (property-based with hypothesis)."""

from __future__ import annotations

import resource
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import run_cli
from metalstm.checkpoint import save_checkpoint
from metalstm.cli import main
from metalstm.config import MAX_LEARNER_SIZE, Config, learner_size
from metalstm.errors import ConfigError
from metalstm.learner import Learner
from metalstm.methods import build_method
from metalstm.methods.base import learner_shape
from metalstm.serialization import method_tensors

FAST = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
TINY = Config.from_dict({"filters": 4, "inner_steps": 2})
MEMORY_BOUND_MB = 500  # what one refused input may add to the process's peak memory


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def assert_clean_exit(code: int, err: str, before_mb: float) -> None:
    assert code in (0, 2), err
    assert "Traceback" not in err
    if code == 2:
        assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert peak_mb() - before_mb < MEMORY_BOUND_MB


def no_temporaries(folder: Path) -> bool:
    return not any(p.name.endswith(".tmp") for p in folder.rglob("*"))


def save_with_meta(path: Path, meta: dict[str, Any]) -> Path:
    """A checksum-valid checkpoint: the tiny model's tensors under any meta."""
    return save_checkpoint(path, method_tensors(build_method(TINY)), meta)


@pytest.fixture
def no_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data root and cache: whatever gets as far as the data fails there, cleanly."""
    empty = tmp_path / "empty"
    empty.mkdir()
    for key in ("METALSTM_DATA", "METALSTM_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(key, str(empty))
    return empty


# -- the bounded checkpoint reader --------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        {"image_size": 100_000},  # was killed for memory
        {"filters": 4000},  # took 5.3 GB before "another learner shape"
        {"filters": 10**9},
        {"hidden_size": 10**9},
        {"n_way": 10**9},
        {"filters": 512, "image_size": 512},  # each size allowed, θ far too large
        [1, 2],
        "config",
    ],
)
def test_checkpoint_config_is_bounded_before_anything_is_built(
    config: object, tmp_path: Path, no_data: Path
) -> None:
    values = {**TINY.to_dict(), **config} if isinstance(config, dict) else config
    path = save_with_meta(tmp_path / "crafted", {"algorithm": "lstm", "config": values})
    before = peak_mb()
    code, _, err = run_cli(["evaluate", "--checkpoint", str(path), "--episodes", "2"])
    assert code == 2
    assert_clean_exit(code, err, before)
    assert "crafted.safetensors" in err


def test_learner_size_is_the_learners_parameter_count() -> None:
    for values in (
        {},
        {"image_size": 84, "channels": 3},
        {"n_way": 20, "filters": 7},
        {"image_size": 84, "downsample": "stride"},
    ):
        config = Config.from_dict(values)
        assert learner_size(config) == Learner(learner_shape(config)).n_params
    with pytest.raises(ConfigError, match="more than the"):
        Config.from_dict({"filters": 512, "image_size": 512})
    with pytest.raises(ConfigError, match="downsample"):
        Config.from_dict({"downsample": "dilate"})
    assert learner_size(Config.from_dict({"filters": 256, "image_size": 84})) < MAX_LEARNER_SIZE


def test_non_finite_weights_are_refused_at_load(tmp_path: Path) -> None:
    tensors = method_tensors(build_method(TINY))
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    meta = {"algorithm": "lstm", "config": TINY.to_dict()}
    path = save_checkpoint(tmp_path / "diverged", tensors, meta)
    code, _, err = run_cli(["evaluate", "--checkpoint", str(path)])
    assert code == 2 and "non-finite" in err and name.removeprefix("model.") in err


MALFORMED_TRAIN_STATES = [
    None,
    [1],
    {"step": "abc"},
    {"bogus": 1},
    {"step": 1, "elapsed": "1 h"},
    {"step": 1, "cpu_seconds": None},
    {"step": 1, "machines": "Xeon"},
    {"step": 1, "machines": [3]},
    {"step": 0},  # a good train_state: the optimizer's param groups are what is malformed
]


@pytest.mark.parametrize("train_state", MALFORMED_TRAIN_STATES)
def test_a_malformed_train_state_or_optimizer_is_one_line(
    train_state: object, tmp_path: Path, data_env: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    config = Config.from_dict({**TINY.to_dict(), "val_episodes": 2, "episodes": 4})
    (run / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
    meta = {"algorithm": "lstm", "config": config.to_dict(), "train_state": train_state}
    meta["optimizer"] = "not param groups"
    save_with_meta(run / "last", meta)
    code, _, err = run_cli(["train", "--resume", str(run), "--quiet"])
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("metalstm: error: no usable checkpoint"), err
    assert ("optimizer" if train_state == {"step": 0} else "train_state") in err


# -- properties over command lines, settings and checkpoint meta --------------------------------
SIZES = st.sampled_from(["-1", "0", "1", "15", "100000", "1000000", str(10**12), "abc"])
KEYS = st.sampled_from([f.name for f in Config.__dataclass_fields__.values()])
VALUES = st.one_of(
    st.sampled_from(["inf", "-inf", "nan", "1e308", "0", "-1", "100000", str(10**9), "", "x"]),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats().map(str),
)


@st.composite
def command_lines(draw: st.DrawFn, folder: Path, checkpoint: Path) -> list[str]:
    kind = draw(st.sampled_from(["bench", "evaluate", "train", "predict", "plot"]))
    if kind == "bench":
        flag = draw(st.sampled_from(["--image-size", "--filters", "--ways", "--steps", "--hidden"]))
        return ["bench", flag, draw(SIZES), "--episodes", "1", "--out", str(folder / "b.json")]
    if kind == "evaluate":
        return ["evaluate", "--checkpoint", str(checkpoint), "--episodes", draw(SIZES),
                "--out", str(folder / "e.json")]  # fmt: skip
    if kind == "train":
        setting = f"{draw(KEYS)}={draw(VALUES)}"
        return ["train", "--preset", "omniglot-5w1s", "--out", str(folder / "run"),
                "--set", setting, "--quiet"]  # fmt: skip
    if kind == "predict":
        return ["predict", "--checkpoint", str(checkpoint), "--support", str(folder),
                "--query", "/dev/zero", "--steps", draw(SIZES)]  # fmt: skip
    return ["plot", "gates", "--checkpoint", str(checkpoint), "--episodes", draw(SIZES),
            "--out", str(folder / "g.png")]  # fmt: skip


def test_command_lines_exit_cleanly_and_write_nothing_when_refused(
    tmp_path: Path, no_data: Path
) -> None:
    checkpoint = save_with_meta(tmp_path / "model", {"algorithm": "lstm", "config": TINY.to_dict()})
    outputs = tmp_path / "out"
    outputs.mkdir()

    @FAST
    @given(command_lines(outputs, checkpoint))
    def check(argv: list[str]) -> None:
        shutil.rmtree(outputs)
        outputs.mkdir()
        before = peak_mb()
        code, _, err = run_cli(argv)
        assert_clean_exit(code, err, before)
        assert no_temporaries(tmp_path)
        if code != 0:
            assert not any(outputs.iterdir()), argv  # nothing half-made: no run folder, no file

    check()


CONFIG_VALUES = st.dictionaries(
    KEYS,
    st.one_of(
        st.integers(min_value=-(10**12), max_value=10**12),
        st.floats(),
        st.text(max_size=6),
        st.booleans(),
        st.none(),
    ),
    max_size=4,
)
META = st.one_of(
    st.fixed_dictionaries({"algorithm": st.just("lstm"), "config": CONFIG_VALUES}),
    st.dictionaries(st.sampled_from(["algorithm", "config", "train_state"]), st.none(), max_size=3),
    st.fixed_dictionaries({"algorithm": st.text(max_size=6), "config": st.lists(st.integers())}),
)


def test_checkpoint_meta_never_crashes_nor_allocates(tmp_path: Path, no_data: Path) -> None:
    @FAST
    @given(META)
    def check(meta: dict[str, Any]) -> None:
        if isinstance(meta.get("config"), dict):
            meta = {**meta, "config": {**TINY.to_dict(), **meta["config"]}}
        path = save_with_meta(tmp_path / "meta", meta)
        before = peak_mb()
        code, _, err = run_cli(["evaluate", "--checkpoint", str(path), "--episodes", "2"])
        assert code == 2  # no data: even a usable checkpoint stops there, cleanly
        assert_clean_exit(code, err, before)

    check()


def test_control_characters_in_class_and_file_names_are_escaped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = save_with_meta(tmp_path / "model", {"algorithm": "lstm", "config": TINY.to_dict()})
    rng = np.random.default_rng(0)
    for folder in ("support/a\rx\x1b[2J", "support/b", "query"):
        (tmp_path / folder).mkdir(parents=True)
        image = Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8))
        image.save(tmp_path / folder / "1\r.png")
    argv = ["predict", "--checkpoint", str(checkpoint), "--support", str(tmp_path / "support")]
    assert main([*argv, "--query", str(tmp_path / "query")]) == 0
    out, err = capsys.readouterr()
    assert "\r" not in out + err and "\x1b" not in out + err
    assert "a\\rx\\x1b[2J" in out and "1\\r.png" in out
