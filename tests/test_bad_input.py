"""Bad input everywhere: every failure is a one-line message with exit code 2, never a traceback,
and leaves no partial output (property-based with hypothesis)."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from metalstm.config import Config, override
from metalstm.data import load_image_folder, load_images
from metalstm.errors import ConfigError, DataError

FAST = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))


def assert_one_line_usage_error(code: int, err: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0]


TOKENS = st.sampled_from(
    [
        "train", "evaluate", "data", "verify", "omniglot", "plot", "gates", "curves", "presets",
        "--preset", "omniglot-5w1s", "nope", "--out", "--episodes", "-3", "0", "abc", "--set",
        "filters=abc", "n_way=1", "bogus=1", "lr=-1", "k_shot=", "=", "--checkpoint", "x/../y",
        "--resume", "--seed", "1.5", "--json", "--force", "--run", "--steps", "--data-root",
    ]
)  # fmt: skip


@FAST
@given(st.lists(st.one_of(TOKENS, st.text(max_size=8)), max_size=7))
@example(["presets", "\r"])  # a carriage return in an argument once split the message in two
@example(["evaluate", "--checkpoint", "a\nb"])
def test_random_command_lines_fail_cleanly(argv: list[str]) -> None:
    saved = {key: os.environ.get(key) for key in ("METALSTM_DATA", "METALSTM_CACHE")}
    with tempfile.TemporaryDirectory() as empty:
        # Any command that gets as far as reading data finds none: it must fail cleanly too.
        os.environ.update({key: empty for key in saved})
        try:
            code, _, err = run_cli(argv)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if code != 0:
            assert_one_line_usage_error(code, err)


KEYS = st.sampled_from([*Config.__dataclass_fields__, "bogus", "", "n way"])
VALUES = st.one_of(
    st.text(max_size=10), st.integers(), st.floats(allow_nan=True), st.booleans(), st.none()
)


@FAST
@given(st.dictionaries(KEYS, VALUES, max_size=4))
def test_config_overrides_give_a_config_or_a_config_error(values: dict[str, object]) -> None:
    try:
        config = override(Config(), values)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(config, Config)


def _image_bytes(kind: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    mode = {"png-rgb": "RGB", "png-gray": "L", "png-1bit": "1", "png-rgba": "RGBA"}.get(kind, "RGB")
    Image.new(mode, size, color=0 if mode == "1" else 128).save(buffer, format="PNG")
    data = buffer.getvalue()
    if kind == "truncated":
        return data[: len(data) // 2]
    if kind == "empty":
        return b""
    if kind == "text":
        return b"not an image at all\n"
    return data


FILE_KINDS = st.sampled_from(
    ["png-rgb", "png-gray", "png-1bit", "png-rgba", "truncated", "empty", "text"]
)
SIZES = st.tuples(st.integers(1, 64), st.integers(1, 64))


@FAST
@given(st.lists(st.lists(st.tuples(FILE_KINDS, SIZES), max_size=3), max_size=3))
def test_folder_layouts_load_or_fail_with_a_data_error(layout: list[list[tuple]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "layout"
        root.mkdir()
        for c, files in enumerate(layout):
            folder = root / f"class{c}"
            folder.mkdir()
            for i, (kind, size) in enumerate(files):
                (folder / f"{i}.png").write_bytes(_image_bytes(kind, size))
        try:
            data = load_image_folder(root, image_size=16, channels=1)
        except DataError as error:
            assert "\n" not in str(error)
        else:
            assert data.n_classes == len(layout) > 0
            assert tuple(data.images.shape[1:]) == (1, 16, 16)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_an_image(blob: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.png"
        path.write_bytes(blob)
        with pytest.raises(DataError) as error:
            load_images([path], image_size=16, channels=3)
        assert str(path) in str(error.value) or path.name in str(error.value)


def test_huge_image_is_resized_without_warning(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"  # 144 Mpixel: over PIL's warning limit, under its error limit
    path.write_bytes(_image_bytes("png-gray", (12000, 12000)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        images = load_images([path], image_size=16, channels=1)
    assert tuple(images.shape) == (1, 1, 16, 16)


def test_decompression_bomb_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    path = tmp_path / "bomb.png"
    path.write_bytes(_image_bytes("png-gray", (400, 400)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400 * 400 // 3)  # the error limit is twice this
    with pytest.raises(DataError, match=r"cannot read image .*bomb\.png.*replace or remove it"):
        load_images([path], image_size=16, channels=1)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["evaluate", "plot-gates"])
def test_malicious_pickle_checkpoint_never_runs(tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps(_Payload(marker)))
    out_file = tmp_path / "result.json"
    argv = (
        ["evaluate", "--checkpoint", str(bad), "--out", str(out_file)]
        if command == "evaluate"
        else ["plot", "gates", "--checkpoint", str(bad), "--out", str(tmp_path / "g.png")]
    )
    code, _, err = run_cli(argv)
    assert_one_line_usage_error(code, err)
    assert "pickle" in err
    assert not marker.exists()
    assert not out_file.exists() and not (tmp_path / "g.png").exists()


def test_shipped_name_cannot_escape_its_folder(tmp_path: Path) -> None:
    code, _, err = run_cli(["evaluate", "--checkpoint", "../../../etc/passwd"])
    assert_one_line_usage_error(code, err)


#: Runs the ``metalstm`` entry point with a Ctrl-C delivered while torch is being imported: an
#: import hook sends SIGINT to the process when ``import torch`` starts. Python's own SIGINT
#: handler is installed first, as on a terminal: a process started in the background by a
#: non-interactive shell (``cmd &``, as some CI runners do) inherits SIGINT ignored.
CTRL_C_WHILE_TORCH_LOADS = """
import importlib.abc, os, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)

class SigintOnTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, SigintOnTorch())
from metalstm.entry import main
sys.exit(main(["presets"]))
"""


def test_ctrl_c_while_the_command_starts_is_one_line_and_exit_130() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CTRL_C_WHILE_TORCH_LOADS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 130, result.stderr
    assert result.stderr == "metalstm: interrupted\n"


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``metalstm methods | head -1``: stdout closed before the command prints (exit 141, as
    when SIGPIPE kills a Unix tool), with no traceback."""
    command = [sys.executable, "-m", "metalstm", "methods", "--preset", "omniglot-5w1s"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command has imported torch, let alone printed
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 141 and err == ""
