"""metalstm predict: support/query folders → labels and probabilities; the tensor API; bad input."""

from __future__ import annotations

import csv
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from metalstm.checkpoint import save_checkpoint
from metalstm.cli import main as cli_main
from metalstm.config import Config
from metalstm.errors import DataError
from metalstm.methods import build_method
from metalstm.predict import adapt, load_model, predict, predict_folders
from metalstm.predict.rendering import _short, grid_figure
from metalstm.serialization import method_tensors

SMALL = {"filters": 4, "inner_steps": 2, "n_way": 5}


def save_untrained(path: Path, **values: object) -> Path:
    """An untrained model saved in the format of training.Trainer.save (model tensors + meta)."""
    config = Config.from_dict({**SMALL, **values})
    model = build_method(config)
    meta = {"algorithm": config.method, "config": config.to_dict()}
    return save_checkpoint(path, method_tensors(model), meta)


@pytest.fixture(scope="session")
def gray_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    return save_untrained(folder / "gray", dataset="omniglot", channels=1, image_size=28)


@pytest.fixture(scope="session")
def rgb_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    return save_untrained(folder / "rgb", dataset="folder", channels=3, image_size=16)


@pytest.fixture(scope="session")
def omniglot_layout(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """support/CHAR/1 drawing, query/CHAR/2 drawings, for 5 Omniglot evaluation characters."""
    root = tmp_path_factory.mktemp("omniglot-layout")
    with zipfile.ZipFile(data_root / "omniglot" / "images_evaluation.zip") as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png") and "/Tengwar/" in n)
        characters = sorted({n.rsplit("/", 1)[0] for n in names})[:5]
        for character in characters:
            files = [n for n in names if n.startswith(character + "/")][:3]
            label = "Tengwar-" + character.rsplit("/", 1)[1]
            for i, name in enumerate(files):
                part = "support" if i == 0 else "query"
                dest = root / part / label / Path(name).name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(archive.read(name))
    return root


def write_png(path: Path, seed: int, size: tuple[int, int] = (24, 20), mode: str = "RGB") -> Path:
    """A generated image: a class-coloured background with noise (numpy → Pillow)."""
    rng = np.random.default_rng(seed)
    base = np.array([(seed * 70) % 256, (seed * 130) % 256, (seed * 190) % 256], dtype=np.int16)
    pixels = np.clip(base + rng.integers(-30, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def rgb_layout(root: Path, classes: dict[str, int], queries: int = 2) -> Path:
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            write_png(root / "support" / name / f"s{i}.png", seed=c + 1, size=(24 + i, 20))
        for i in range(queries):
            write_png(root / "query" / name / f"q{i}.png", seed=c + 1, size=(30, 30 + i))
    return root


def run(argv: Sequence[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli_main(["predict", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------ folders


def test_omniglot_layout_csv_and_visualize(
    omniglot_layout: Path, gray_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out, png = tmp_path / "out" / "labels.csv", tmp_path / "grid.png"
    argv = ["--checkpoint", gray_checkpoint, "--support", omniglot_layout / "support"]
    argv += ["--query", omniglot_layout / "query", "--out", out, "--visualize", png]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "inversion: yes (auto: the support images are light" in stderr
    assert "5 classes x 1 images; query: 10 images" in stderr
    with out.open() as f:
        rows = list(csv.reader(f))
    classes = sorted(p.name for p in (omniglot_layout / "support").iterdir())
    assert rows[0] == ["file", "label", "truth", *(f"p_{c}" for c in classes)]
    assert len(rows) == 11
    for row in rows[1:]:
        assert row[1] in classes and row[2] == Path(row[0]).parent.name  # the folder's class
        probabilities = [float(p) for p in row[3:]]
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
        assert row[1] == classes[int(np.argmax(probabilities))]
    # the terminal table: a truth column, a mark on wrong rows, and the accuracy line
    table = stdout.splitlines()
    assert table[0].split() == ["file", "label", "truth", "p"]
    right = sum(row[1] == row[2] for row in rows[1:])
    for line, row in zip(table[1:11], rows[1:], strict=True):
        assert line.split()[1:3] == row[1:3] and row[0].endswith(line.split()[0].lstrip("…"))
        assert line.endswith("✗") == (row[1] != row[2])
    expected = f"accuracy: {100 * right / 10:.1f} % on the 10 query images whose folder names"
    assert expected in stdout
    with Image.open(png) as image:
        assert image.format == "PNG" and image.width > 200
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["grid.png", "labels.csv"]


def test_rgb_layout_json_stdout(
    rgb_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = rgb_layout(tmp_path, {"bolt": 3, "nut": 3, "washer": 3})
    argv = ["--checkpoint", rgb_checkpoint, "--support", root / "support"]
    argv += ["--query", root / "query", "--json"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 0, stderr
    assert "inversion: no (auto: the checkpoint was trained on images that were not inverted)" in (
        stderr
    )
    rows = json.loads(stdout)
    assert len(rows) == 6
    for row in rows:
        assert list(row) == ["file", "label", "truth", "probabilities"]
        assert row["truth"] == Path(row["file"]).parent.name
        assert list(row["probabilities"]) == ["bolt", "nut", "washer"]  # N=3 < N_train=5
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def test_json_file_matches_stdout_and_files_as_query(
    rgb_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = rgb_layout(tmp_path, {"a": 2, "b": 2})
    files = sorted((root / "query").rglob("*.png"))
    out = tmp_path / "rows.json"
    argv = ["--checkpoint", rgb_checkpoint, "--support", root / "support", "--query", *files]
    code, stdout, _ = run([*argv, files[0], "--out", out, "--json"], capsys)  # a duplicate
    assert code == 0
    assert json.loads(out.read_text()) == json.loads(stdout)
    assert [r["file"] for r in json.loads(stdout)] == [str(f) for f in files]


def query_titles(figure: Any) -> list[tuple[str, str]]:
    """(title, colour) of every query image of a --visualize figure, in order."""
    titles = [ax.title for ax in figure.axes if ax.get_title() and "support" not in ax.get_title()]
    return [(t.get_text(), t.get_color()) for t in titles]


def test_grid_marks_wrong_predictions_with_the_truth_and_explains_the_colours(
    omniglot_layout: Path, gray_checkpoint: Path
) -> None:
    result = predict_folders(
        gray_checkpoint, omniglot_layout / "support", [omniglot_layout / "query"]
    )
    assert all(t is not None for t in result.truth)
    figure = grid_figure(result)
    title = figure.get_suptitle()
    assert "green: right, red: wrong (with the true label)" in title
    assert f"accuracy {100 * result.accuracy:.1f} % on the 10 query images" in title
    shown = query_titles(figure)
    assert len(shown) == 10
    for (text, colour), label, truth in zip(shown, result.labels, result.truth, strict=True):
        if label == truth:
            assert colour == "green" and "true" not in text
        else:
            assert colour == "red" and text.endswith(f"true {_short(truth)}")
    assert {colour for _, colour in shown} == {"green", "red"}  # this model gets some wrong


def test_grid_of_a_flat_query_folder_says_nothing_of_colours(
    omniglot_layout: Path, gray_checkpoint: Path, tmp_path: Path
) -> None:
    for i, path in enumerate(sorted((omniglot_layout / "query").rglob("*.png"))):
        (tmp_path / f"{i}.png").write_bytes(path.read_bytes())  # no class folders: no truth
    result = predict_folders(gray_checkpoint, omniglot_layout / "support", [tmp_path])
    assert result.truth == [None] * 10 and result.accuracy is None
    figure = grid_figure(result)
    title = figure.get_suptitle()
    assert title.startswith("top: support images") and title.endswith("and its probability")
    assert not {"red", "green", "wrong", "accuracy"} & set(title.replace(":", " ").split())
    assert {colour for _, colour in query_titles(figure)} == {"black"}
    assert "truth" not in result.rows()[0]


def test_inversion_flag_is_obeyed_and_reported(
    omniglot_layout: Path, gray_checkpoint: Path
) -> None:
    args = (gray_checkpoint, omniglot_layout / "support", [omniglot_layout / "query"])
    forced_no = predict_folders(*args, invert="no")
    auto = predict_folders(*args)
    assert not forced_no.inverted and auto.inverted
    assert "--invert no" in forced_no.inversion_reason
    assert torch.equal(auto.support_images, 255 - forced_no.support_images)
    assert torch.equal(auto.query_images, 255 - forced_no.query_images)


def test_dark_drawings_are_not_inverted_by_auto(
    omniglot_layout: Path, gray_checkpoint: Path, tmp_path: Path
) -> None:
    for path in (omniglot_layout / "support").rglob("*.png"):
        dest = tmp_path / path.relative_to(omniglot_layout)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as image:
            ImageOps.invert(image.convert("L")).save(dest)
    result = predict_folders(gray_checkpoint, tmp_path / "support", [omniglot_layout / "query"])
    assert not result.inverted
    assert result.inversion_reason.startswith("no (auto: the support images are dark")


def test_unequal_shots_and_mixed_modes_are_accepted(
    gray_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    write_png(tmp_path / "s" / "a" / "1.png", 1, size=(50, 40), mode="RGBA")
    write_png(tmp_path / "s" / "a" / "2.jpg", 1, size=(10, 12), mode="L")
    write_png(tmp_path / "s" / "a" / "3.bmp", 1, size=(28, 28), mode="P")
    write_png(tmp_path / "s" / "b" / "1.gif", 2, size=(33, 21), mode="1")
    write_png(tmp_path / "q" / "x.png", 3, size=(99, 7), mode="LA")
    argv = ["--checkpoint", gray_checkpoint, "--support", tmp_path / "s", "--query"]
    code, stdout, stderr = run([*argv, tmp_path / "q"], capsys)
    assert code == 0, stderr
    assert "unequal numbers of support images (1 to 3); accepted" in stderr
    assert "2 classes x 1-3 images" in stderr
    assert "accuracy" not in stdout and "truth" not in stdout  # no true labels known
    assert stdout.splitlines()[0].split() == ["file", "label", "p"]


# ------------------------------------------------------------------------------------ bad input


def _bad_layouts(root: Path, kind: str) -> tuple[Path, list[Path]]:
    """(support folder, query items) for one kind of bad input."""
    good = rgb_layout(root / "good", {"a": 2, "b": 2})
    support, query = good / "support", [good / "query"]
    if kind == "empty class folder":
        (support / "c").mkdir()
    elif kind == "empty support":
        support = root / "empty"
        support.mkdir()
    elif kind == "missing support":
        support = root / "nowhere"
    elif kind == "loose file in support":
        write_png(support / "loose.png", 1)
    elif kind == "non-image in class":
        (support / "a" / "notes.txt").write_text("hello")
    elif kind == "unreadable image":
        (support / "b" / "broken.png").write_bytes(b"not a png at all")
    elif kind == "truncated query image":
        data = (good / "query" / "a" / "q0.png").read_bytes()
        (good / "query" / "a" / "q0.png").write_bytes(data[:40])
    elif kind == "empty query folder":
        query = [root / "q-empty"]
        query[0].mkdir()
    elif kind == "non-image in query":
        (good / "query" / "readme.md").write_text("x")
    elif kind == "missing query":
        query = [root / "no-such.png"]
    elif kind == "nested query":
        write_png(good / "query" / "a" / "deeper" / "x.png", 1)
    elif kind == "one class":
        support = rgb_layout(root / "one", {"only": 2}) / "support"
    elif kind == "too many classes":
        support = rgb_layout(root / "six", {c: 1 for c in "abcdef"}) / "support"
    return support, query


BAD_LAYOUTS = {
    "empty class folder": "holds no images",
    "empty support": "has no class sub-folders",
    "missing support": "does not exist",
    "loose file in support": "at its top level",
    "non-image in class": "is not an image",
    "unreadable image": "cannot read image",
    "truncated query image": "cannot read image",
    "empty query folder": "holds no images",
    "non-image in query": "is not an image",
    "missing query": "does not exist",
    "nested query": "one level deep",
    "one class": "at least 2 classes",
    "too many classes": "supports at most 5",
}


@pytest.mark.parametrize("kind", list(BAD_LAYOUTS))
def test_bad_input_one_line_exit_2_no_output(
    kind: str, rgb_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    support, query = _bad_layouts(tmp_path / "in", kind)
    out_dir = tmp_path / "out"
    argv = ["--checkpoint", rgb_checkpoint, "--support", support, "--query", *query]
    argv += ["--out", out_dir / "rows.csv", "--visualize", out_dir / "grid.png"]
    code, stdout, stderr = run(argv, capsys)
    assert code == 2
    assert stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("metalstm: error: ")
    assert BAD_LAYOUTS[kind] in stderr
    assert not out_dir.exists()


def test_bad_options_and_checkpoints(
    gray_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = rgb_layout(tmp_path / "in", {"a": 1, "b": 1})
    base = ["--support", root / "support", "--query", root / "query"]
    # a checkpoint whose tensors are of another input shape than its config says
    config = Config.from_dict({**SMALL, "channels": 3})
    tensors = method_tensors(build_method(Config.from_dict({**SMALL, "channels": 1})))
    foreign = save_checkpoint(
        tmp_path / "foreign", tensors, {"algorithm": "lstm", "config": config.to_dict()}
    )
    not_a_checkpoint = tmp_path / "x.safetensors"
    not_a_checkpoint.write_bytes(b"garbage" * 10)
    cases = [
        (["--checkpoint", foreign], "another learner shape"),
        (["--checkpoint", not_a_checkpoint], "not a safetensors checkpoint"),
        (["--checkpoint", tmp_path / "missing"], "does not exist"),
        (["--checkpoint", gray_checkpoint, "--out", tmp_path / "o.txt"], "must end in .csv"),
        (["--checkpoint", gray_checkpoint, "--visualize", tmp_path / "v.jpg"], "end in .png"),
        (["--checkpoint", gray_checkpoint, "--steps", "0"], "at least 1 inner step"),
    ]
    for extra, message in cases:
        code, stdout, stderr = run([*base, *extra], capsys)
        assert code == 2, extra
        assert stderr.count("\n") == 1 and message in stderr, stderr
        assert stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in", "foreign.safetensors", "x.safetensors"]
    )


# ------------------------------------------------------------------------------------ tensors


def test_tensor_api(gray_checkpoint: Path) -> None:
    model, _ = load_model(gray_checkpoint, steps=3)
    assert model.settings.eval_steps == 3 and not model.config.transductive
    generator = torch.Generator().manual_seed(0)
    support_x = torch.rand(6, 1, 28, 28, generator=generator)
    support_y = torch.tensor([0, 0, 1, 1, 2, 2])
    query_x = torch.rand(7, 1, 28, 28, generator=generator)
    labels, probabilities = predict(model, support_x, support_y, query_x)
    assert labels.shape == (7,) and probabilities.shape == (7, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(7), atol=1e-5)
    assert torch.equal(labels, probabilities.argmax(-1))
    # each query image is labelled on its own (batch norm from the support set only)
    classifier = adapt(model, (support_x * 255).round().to(torch.uint8), support_y)
    alone = torch.cat(
        [classifier.probabilities((query_x[i : i + 1] * 255).round() / 255) for i in range(7)]
    )
    together = classifier.probabilities((query_x * 255).round() / 255)
    assert torch.allclose(alone, together, atol=1e-5)
    assert classifier(query_x).shape == (7, 3)


def test_a_head_built_per_episode_takes_any_number_of_classes(tmp_path: Path) -> None:
    """A meta-learner with head_init=prototypes has no output layer of a fixed size: a 5-way
    checkpoint labels 7 classes."""
    path = save_untrained(
        tmp_path / "proto", dataset="omniglot", settings={"head_init": "prototypes"}
    )
    model, _ = load_model(path)
    assert model.config.n_way == 5
    classifier = adapt(model, torch.rand(7, 1, 28, 28), torch.arange(7))
    labels, probabilities = classifier.predict(torch.rand(3, 1, 28, 28))
    assert probabilities.shape == (3, 7) and labels.shape == (3,)


def test_tensor_api_bad_input(gray_checkpoint: Path) -> None:
    model, _ = load_model(gray_checkpoint)
    x = torch.rand(4, 1, 28, 28)
    with pytest.raises(DataError, match="model takes 1x28x28"):
        predict(model, torch.rand(4, 3, 28, 28), torch.tensor([0, 0, 1, 1]), x)
    with pytest.raises(DataError, match="class 1 has no image"):
        adapt(model, x, torch.tensor([0, 0, 2, 2]))
    with pytest.raises(DataError, match="at most 5"):
        adapt(model, torch.rand(6, 1, 28, 28), torch.arange(6))
    with pytest.raises(DataError, match="4 support images but 3 labels"):
        adapt(model, x, torch.tensor([0, 1, 1]))
    with pytest.raises(DataError, match="at least 2 classes"):
        adapt(model, x, torch.zeros(4, dtype=torch.long))
