"""`metalstm compare`: options, settings precedence, identical episodes, reports and checkpoints."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from metalstm import build_method, cli, compare
from metalstm.checkpoint import save_checkpoint
from metalstm.compare import (
    RecordingSampler,
    Request,
    add_compare_arguments,
    base_config,
    compare_main,
    given_checkpoint,
    method_config,
)
from metalstm.compare.evaluation import method_notes
from metalstm.compare.training import Cost, Trained
from metalstm.config import Config, load_preset, override
from metalstm.data import ClassImages, Episode, fixed_episodes, load_split
from metalstm.errors import ConfigError
from metalstm.evaluation import protocol_for
from metalstm.machine import describe
from metalstm.registry import method_entry, method_names
from metalstm.serialization import method_meta, method_tensors
from metalstm.training import UNRECORDED

pytestmark = pytest.mark.usefixtures("one_thread")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="metalstm compare")
    add_compare_arguments(parser)
    return parser.parse_args(list(argv))


RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def request(*argv: str) -> Request:
    return Request.from_args(parse("--preset", "omniglot-5w1s", "--out", "OUT", *argv))


def compare_config(preset: str, method: str, *argv: str) -> Config:
    """The config ``compare --preset PRESET ARGV`` trains ``method`` with."""
    return method_config(
        Request.from_args(parse("--preset", preset, "--out", "O", *argv)), method, int
    )


# -- options -------------------------------------------------------------------------------------
def test_methods_all_or_a_list_in_table_order() -> None:
    assert request().methods == method_names()
    assert request("--methods", "all").methods == method_names()
    assert request("--methods", "protonet, maml,protonet").methods == ("maml", "protonet")
    with pytest.raises(ConfigError, match="unknown method 'snail'"):
        request("--methods", "snail")
    with pytest.raises(ConfigError, match="empty"):
        request("--methods", ",")


def test_checkpoint_and_set_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="METHOD=PATH"):
        request("--checkpoint", "runs/x/best")
    with pytest.raises(ConfigError, match="unknown method"):
        request("--checkpoint", "resnet=runs/x")
    with pytest.raises(ConfigError, match="key=value"):
        request("--set", "filters")
    with pytest.raises(ConfigError, match="unknown method"):
        request("--set", "snail:filters=8")
    with pytest.raises(ConfigError, match="--episodes"):
        request("--episodes", "0")
    with pytest.raises(ConfigError, match="unknown config key"):
        base_config(request("--set", "filterz=8"))


def test_command_line_reproduces_the_request() -> None:
    original = request(
        "--methods",
        "maml,nn-pixel",
        "--episodes",
        "50",
        "--seed",
        "3",
        "--set",
        "filters=8",
        "--set",
        "maml:inner_steps=2",
        "--checkpoint",
        "maml=runs/m/best",
        "--train-episodes",
        "10",
    )
    words = original.command().split()
    assert words[:2] == ["metalstm", "compare"]
    assert Request.from_args(parse(*words[2:])) == original


def test_settings_precedence_preset_recipe_set_method_set_train_episodes() -> None:
    req = request(
        "--set",
        "filters=8",
        "--set",
        "maml_inner_lr=0.3",
        "--set",
        "maml:maml_inner_lr=0.2",
        "--train-episodes",
        "40",
        "--episodes",
        "7",
        "--seed",
        "5",
    )
    maml = method_config(req, "maml", lambda: 1000)
    assert maml.method == "maml" and maml.filters == 8 and maml.settings.inner_lr == 0.2
    assert maml.settings.query_bn == "final"  # the recipe's: queries normalised at θ_T
    recipe = method_entry("maml").recipe(load_preset("omniglot-5w1s"))
    assert maml.settings.inner_steps == recipe["inner_steps"]
    assert maml.episodes == 40 and maml.test_episodes == 7 and maml.test_seed == 5
    protonet = method_config(req, "protonet", lambda: 1000)
    # a setting of MAML's applies to the methods that have it only
    assert not hasattr(protonet.settings, "inner_lr") and protonet.bn_momentum == 1.0
    finetune = method_config(req, "finetune", lambda: 640)  # 10 batches of 64 per epoch
    assert finetune.settings.pretrain_epochs == pytest.approx(4.0)
    assert load_preset("omniglot-5w1s") == override(method_config(request(), "lstm", int), {})


@pytest.mark.parametrize("preset", ["omniglot-5w1s", "omniglot-20w5s", "miniimagenet-5w5s"])
def test_methods_lists_the_recipes_compare_trains_with_their_sources(preset: str) -> None:
    code, out, err = run_cli(["methods", "--preset", preset, "--json"])
    assert code == 0, err
    rows = json.loads(out)
    assert tuple(rows) == tuple(method_names())
    test = load_preset(preset)
    for name, row in rows.items():
        trained = compare_config(preset, name).to_dict()
        values = {**trained, **trained.pop("settings")}
        assert {key: values[key] for key in row["recipe"]} == row["recipe"], name
        published = method_entry(name).published.get((test.dataset, test.n_way, test.k_shot))
        assert row["published"] == published
    assert rows["maml"]["reference"].startswith("Finn") and rows["maml"]["recipe"]
    assert rows["protonet"]["recipe"]["train_n_way"] > test.n_way  # Snell et al.'s episodes
    assert rows["nn-pixel"]["recipe"] == {} and rows["nn-pixel"]["published"] is None
    code, out, _ = run_cli(["methods", "--preset", preset])
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith(f"recipes on {preset}")
    maml = lines.index(next(line for line in lines if line.startswith("maml ")))
    assert lines[maml + 1].split() == [f"{k}={v}" for k, v in rows["maml"]["recipe"].items()]


@pytest.mark.parametrize(
    ("preset", "ways", "queries"),
    [("omniglot-5w1s", 60, 5), ("omniglot-20w5s", 60, 5), ("miniimagenet-5w1s", 30, 15)],
)
def test_protonet_trains_on_snell_et_al_episodes(preset: str, ways: int, queries: int) -> None:
    config = compare_config(preset, "protonet")
    test = load_preset(preset)
    assert (config.train_ways, config.train_shots, config.q_query) == (ways, test.k_shot, queries)
    # validation and test keep the comparison's episodes
    assert (config.n_way, config.k_shot, config.eval_queries) == (
        test.n_way,
        test.k_shot,
        test.eval_queries,
    )
    assert (
        method_config(request("--set", "protonet:train_n_way=10"), "protonet", int).train_ways == 10
    )


def committed_config(run: str, method: str) -> dict[str, object]:
    """The config of a committed comparison run (benchmarks/results/compare-recipes/RUN), as this
    version reads it (keys added since take their defaults)."""
    folder = RESULTS / "compare-recipes" / run / "methods" / method
    return Config.from_dict(yaml.safe_load((folder / "config.yaml").read_text())).to_dict()


@pytest.mark.parametrize(
    ("preset", "method", "queries", "committed"),
    [
        ("omniglot-5w1s", "matching", 15, None),
        ("omniglot-20w1s", "matching", 5, "omniglot-20w1s-matching"),
        ("omniglot-20w5s", "matching", 5, "omniglot-20w5s-matching"),
        ("omniglot-5w5s", "matching-fce", 15, "omniglot-5w5s-matching-fce"),
        ("omniglot-20w1s", "matching-fce", 5, "omniglot-20w1s-matching-fce"),
        ("omniglot-20w5s", "matching-fce", 5, "omniglot-20w5s-matching-fce"),
    ],
)
def test_matching_networks_recipe_reproduces_the_committed_runs(
    preset: str, method: str, queries: int, committed: str | None
) -> None:
    """20-way training episodes take 5 queries per class, 5-way ones the test's 15; the configs
    are the committed runs' (benchmarks/results/compare-recipes/)."""
    config = compare_config(preset, method)
    assert (config.q_query, config.episodes) == (queries, 20_000)
    if committed is not None:
        assert config.to_dict() == committed_config(committed, method)


@pytest.mark.parametrize(
    ("preset", "method", "downsample", "meta_batch"),
    [
        ("omniglot-20w1s", "maml", "stride", 4),
        ("omniglot-20w5s", "maml", "stride", 2),
        ("omniglot-20w1s", "maml-fo", "pool", 16),
        ("omniglot-20w5s", "maml-fo", "pool", 16),
    ],
)
def test_maml_20_way_recipe_reproduces_the_committed_runs(
    preset: str, method: str, downsample: str, meta_batch: int
) -> None:
    """Finn et al.'s 20-way settings (α = 0.1, 5 steps, 16 tasks per update; second order on
    their strided learner, and 4 tasks per update on 1-shot, 2 on 5-shot, chosen on validation),
    the committed runs' configs (benchmarks/results/compare-recipes/)."""
    config = compare_config(preset, method)
    settings = config.to_dict()["settings"]
    assert (settings["inner_lr"], settings["inner_steps"]) == (0.1, 5)
    assert (config.downsample, config.meta_batch) == (downsample, meta_batch)
    assert config.to_dict() == committed_config(f"{preset}-{method}", method)


@pytest.mark.parametrize(
    ("preset", "downsample"),
    [
        ("omniglot-20w1s", "stride"),
        ("omniglot-20w5s", "stride"),
        ("omniglot-5w1s", "pool"),
        ("omniglot-5w5s", "stride"),
        ("miniimagenet-5w1s", "pool"),
    ],
)
def test_maml_learner_is_the_one_chosen_on_validation(preset: str, downsample: str) -> None:
    """Second-order MAML on Finn et al.'s strided learner (Sec. 5.2) on Omniglot but 5-way 1-shot;
    first-order MAML and the other methods on the pooled learner (maml.recipe says why)."""
    assert compare_config(preset, "maml").downsample == downsample
    assert compare_config(preset, "maml-fo").downsample == "pool"
    assert compare_config(preset, "protonet").downsample == "pool"


STRIDED = ("--set", "maml:downsample=stride")
# the tried-strided runs predate first-order MAML's 10 test steps on 20-way (session 20)
STRIDED_FO = ("--set", "maml-fo:downsample=stride", "--set", "maml-fo:eval_inner_steps=5")
POOLED_20K = (
    "--set",
    "maml:downsample=pool",
    "--set",
    "maml:meta_batch=32",
    "--train-episodes",
    "20000",
)
FO_LR_1E3 = ("--set", "maml-fo:lr=0.001")
FO_LR_2E3 = ("--set", "maml-fo:lr=0.002")
SO_LR_1E3 = ("--set", "maml:lr=0.001")
SO_FINN_META_BATCH = ("--set", "maml:meta_batch=16")
SO_FINN_5_WAY_META_BATCH = ("--set", "maml:meta_batch=32")
SO_META_BATCH_8 = ("--set", "maml:meta_batch=8")
SO_META_BATCH_4 = ("--set", "maml:meta_batch=4")
SO_META_BATCH_2 = ("--set", "maml:meta_batch=2")
SO_META_BATCH_1 = ("--set", "maml:meta_batch=1")


@pytest.mark.parametrize(
    ("preset", "method", "argv", "run"),
    [
        ("omniglot-20w1s", "maml-fo", STRIDED_FO, "tried-strided/omniglot-20w1s-maml-fo"),
        ("omniglot-20w5s", "maml-fo", STRIDED_FO, "tried-strided/omniglot-20w5s-maml-fo"),
        ("omniglot-5w1s", "maml", (*STRIDED, *SO_LR_1E3), "tried-strided/omniglot-5w1s-maml"),
        ("omniglot-5w5s", "maml", POOLED_20K, "omniglot-5w5s-maml-pooled"),
        ("omniglot-5w1s", "maml-fo", FO_LR_1E3, "tried-fo-5w1s-meta-lr/lr-0.001"),
        ("omniglot-5w1s", "maml-fo", FO_LR_2E3, "tried-fo-5w1s-meta-lr/lr-0.002"),
        ("omniglot-5w1s", "maml", SO_LR_1E3, "tried-so-5w1s-meta-lr/lr-0.001"),
        (
            "omniglot-20w5s",
            "maml",
            SO_FINN_META_BATCH,
            "tried-so-20w-meta-batch/omniglot-20w5s-mb16",
        ),
        (
            "omniglot-20w1s",
            "maml",
            SO_FINN_META_BATCH,
            "tried-so-20w-meta-batch/omniglot-20w1s-mb16",
        ),
        ("omniglot-20w5s", "maml", SO_META_BATCH_4, "tried-so-20w-meta-batch/omniglot-20w5s-mb4"),
        ("omniglot-20w1s", "maml", SO_META_BATCH_2, "tried-so-20w-meta-batch/omniglot-20w1s-mb2"),
        ("omniglot-20w5s", "maml", SO_META_BATCH_1, "tried-so-20w-meta-batch/omniglot-20w5s-mb1"),
        (
            "omniglot-5w5s",
            "maml",
            SO_FINN_5_WAY_META_BATCH,
            "tried-so-5w-meta-batch/omniglot-5w5s-mb32",
        ),
        ("omniglot-5w5s", "maml", SO_META_BATCH_8, "tried-so-5w-meta-batch/omniglot-5w5s-mb8"),
        (
            "omniglot-5w1s",
            "maml",
            SO_META_BATCH_8,
            "tried-so-5w-meta-batch/omniglot-5w1s-mb8-stopped",
        ),
    ],
)
def test_tried_maml_runs_are_the_recipe_with_their_set_options(
    preset: str, method: str, argv: tuple[str, ...], run: str
) -> None:
    """The committed runs of settings the recipe did not choose (the other learner, the other
    meta learning rates and meta-batches) are the recipe with ``--set METHOD:KEY=...`` (and the
    pooled 5-way 5-shot run's 20,000 tasks), as the READMEs' commands say."""
    assert compare_config(preset, method, *argv).to_dict() == committed_config(run, method)


@pytest.mark.parametrize(("method", "alpha", "lr"), [("maml", 0.4, 2e-3), ("maml-fo", 0.1, 4e-3)])
def test_maml_5_way_1_shot_recipe_reproduces_the_committed_runs(
    method: str, alpha: float, lr: float
) -> None:
    """Finn et al.'s 5-way settings on the pooled learner (one step, 32 tasks per update, the
    recipe's 120,000 tasks; α = 0.4, 0.1 first-order; each order's meta learning rate chosen on
    validation), queries normalised at θ_T at test."""
    config = compare_config("omniglot-5w1s", method)
    settings = config.to_dict()["settings"]
    assert (settings["inner_lr"], settings["inner_steps"], settings["query_bn"]) == (
        alpha,
        1,
        "final",
    )
    assert config.lr == lr
    assert (config.downsample, config.episodes, config.meta_batch) == ("pool", 120_000, 32)
    assert config.to_dict() == committed_config(f"omniglot-5w1s-{method}", method)


def test_maml_5_way_5_shot_recipe_reproduces_the_committed_run() -> None:
    """Finn et al.'s 5-way settings on their strided learner, the recipe's 40,000 tasks, in
    updates of 4 tasks (chosen on validation; Finn et al.: 32)."""
    config = compare_config("omniglot-5w5s", "maml")
    assert (config.downsample, config.episodes, config.meta_batch) == ("stride", 40_000, 4)
    assert config.to_dict() == committed_config("omniglot-5w5s-maml", "maml")


@pytest.mark.parametrize(
    ("preset", "committed"),
    [
        ("omniglot-5w1s", None),
        ("omniglot-5w5s", "omniglot-5w5s-finetune"),
        ("omniglot-20w1s", "omniglot-20w1s-finetune"),
        ("omniglot-20w5s", "omniglot-20w5s-finetune"),
    ],
)
def test_finetune_settings_are_chosen_on_as_many_classes_on_every_preset(
    preset: str, committed: str | None
) -> None:
    """The fine-tuning grid is scored on 500 validation classes: 100 episodes of 5-way, 25 of
    20-way (whose 5-shot episodes cost four times as much each); the configs are the committed
    runs' (benchmarks/results/compare-recipes/)."""
    config = compare_config(preset, "finetune")
    assert config.val_episodes * config.n_way == 500
    assert config.val_episodes == (100 if config.n_way == 5 else 25)
    if committed is not None:
        assert config.to_dict() == committed_config(committed, "finetune")


# -- identical episodes --------------------------------------------------------------------------
def synthetic(classes: int = 12, per_class: int = 20) -> ClassImages:
    images = torch.randint(0, 256, (classes * per_class, 1, 4, 4), dtype=torch.uint8)
    return ClassImages.from_counts(images, [per_class] * classes, [f"c{i}" for i in range(classes)])


def test_recording_sampler_fingerprints_the_episodes_it_served() -> None:
    data = synthetic()
    sampler = RecordingSampler(data, 5, 1, 3, seed=4)
    for i in range(6):
        sampler.episode(i)
    assert sampler.fingerprint() == fixed_episodes(data, 5, 1, 3, 4, 6).fingerprint()
    other = RecordingSampler(data, 5, 1, 3, seed=5)
    for i in range(6):
        other.episode(i)
    assert other.fingerprint() != sampler.fingerprint()
    assert sampler.served == 6


def test_a_given_checkpoint_must_match_the_comparison(tmp_path: Path) -> None:
    base = base_config(request())

    def write(name: str, **values: object) -> Path:
        model = build_method(override(base, {"method": name, **values}))
        meta = method_meta(model, "test")
        return save_checkpoint(tmp_path / f"{name}-{len(values)}", method_tensors(model), meta)

    with pytest.raises(ConfigError, match="n_way=3"):
        given_checkpoint("protonet", str(write("protonet", n_way=3)), base)
    with pytest.raises(ConfigError, match="holds a 'matching' model"):
        given_checkpoint("protonet", str(write("matching")), base)
    finetune = write("finetune", pretrain_classes=10)
    assert given_checkpoint("nn-embedding", str(finetune), base).origin == "given"


# -- a tiny end-to-end run -----------------------------------------------------------------------
TINY_RUN = [
    "--preset", "omniglot-5w1s", "--episodes", "6", "--train-episodes", "20", "--quiet",
    "--set", "filters=8", "--set", "q_query=5", "--set", "eval_q_query=5",
    "--set", "val_episodes=3", "--set", "val_interval=1000", "--set", "pretrain_batch=32",
    "--set", "finetune_lr_grid=0.1", "--set", "finetune_steps_grid=5",
]  # fmt: skip
TINY_METHODS = ("finetune", "nn-embedding", "nn-pixel", "protonet")  # registry order


@pytest.mark.slow
def test_compare_writes_table_csv_json_and_chart_on_identical_episodes(
    data_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    samplers: list[RecordingSampler] = []

    class Spy(RecordingSampler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            self.episodes: list[Episode] = []
            samplers.append(self)

        def episode(self, step: int, slot: int = 0) -> Episode:
            self.episodes.append(super().episode(step, slot))
            return self.episodes[-1]

    monkeypatch.setattr(compare.evaluation, "RecordingSampler", Spy)
    out = tmp_path / "cmp"
    compare_main(parse(*TINY_RUN, "--methods", ",".join(TINY_METHODS), "--out", str(out)))
    printed = capsys.readouterr().out
    assert "| Method | Accuracy (%) |" in printed

    # Every method saw the very same episodes: same classes and image rows, episode by episode.
    # One sampler per evaluation: every method, and protonet once more transductively (the
    # others' test statistics come from pre-training or there is no network).
    assert len(samplers) == len(TINY_METHODS) + 1
    first = samplers[0].episodes
    assert len(first) == samplers[0].served == 6
    for sampler in samplers[1:]:
        for a, b in zip(first, sampler.episodes, strict=True):
            for name in ("classes", "support_ids", "query_ids", "support_y", "query_y"):
                assert torch.equal(getattr(a, name), getattr(b, name))
    test = load_split("omniglot", "vinyals", "test", data_root=data_env)
    expected = fixed_episodes(test, 5, 1, 5, 0, 6).fingerprint()

    results = json.loads((out / "results.json").read_text())
    assert results["fingerprint"] == expected
    assert [m["method"] for m in results["methods"]] == list(TINY_METHODS)
    for row in results["methods"]:
        assert row["fingerprint"] == expected and row["episodes"] == 6
        assert len(row["per_episode"]) == 6 and 0.0 <= row["accuracy"] <= 1.0
    by_name = {row["method"]: row for row in results["methods"]}
    assert by_name["nn-pixel"]["train_seconds"] == 0.0  # nothing to train
    # Every time names its machine: where the comparison ran, and each method's training (all
    # here, on this CPU, in this process's thread count), with CPU time beside wall time.
    here = describe(torch.device("cpu"))
    assert results["machine"] == here
    for name in ("finetune", "nn-embedding", "protonet"):
        row = by_name[name]
        assert row["train_machines"] == [here], name
        assert row["train_cpu_seconds"] > 0.0 and row["eval_cpu_seconds"] > 0.0, name
    assert (by_name["nn-pixel"]["train_cpu_seconds"], by_name["nn-pixel"]["train_machines"]) == (
        0.0,
        [],
    )
    transductive = {m: row["transductive_accuracy"] for m, row in by_name.items()}
    assert [m for m, value in transductive.items() if value is not None] == ["protonet"]
    shared = by_name["nn-embedding"]
    assert shared["train_origin"] == "shared" and "finetune" in shared["notes"]

    table = (out / "results.md").read_text()
    assert "6 fixed episodes" in table and expected[:16] in table and "metalstm compare" in table
    assert all(f"(`{m}`)" in table for m in TINY_METHODS) and "| Transductive (%) |" in table
    assert f"Machine: {here} (evaluation and training)." in table
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == list(TINY_METHODS)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # `metalstm evaluate` works on every method's checkpoint and finds the same accuracy.
    for row in results["methods"]:
        code = cli.main(
            ["evaluate", "--checkpoint", row["checkpoint"], "--episodes", "6", "--json"]
        )
        assert code == 0
        evaluated = json.loads(capsys.readouterr().out)
        assert evaluated["accuracy"] == pytest.approx(row["accuracy"])
    protonet = by_name["protonet"]["checkpoint"]
    argv = ["evaluate", "--checkpoint", protonet, "--episodes", "6", "--transductive", "--json"]
    assert cli.main(argv) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(transductive["protonet"])

    # A second run reuses the finished runs and a given checkpoint: nothing is trained again.
    given = out / "runs" / "protonet" / "best.safetensors"
    argv = [*TINY_RUN, "--methods", "protonet,nn-embedding", "--out", str(out), "--json"]
    compare_main(parse(*argv, "--checkpoint", f"protonet={given}"))
    again = json.loads(capsys.readouterr().out)
    origins = {m["method"]: m["train_origin"] for m in again["methods"]}
    assert origins == {"protonet": "given", "nn-embedding": "shared"}
    before = {m["method"]: m["accuracy"] for m in results["methods"]}
    assert all(m["accuracy"] == before[m["method"]] for m in again["methods"])


def test_untrained_and_config_only_methods_need_no_data(tmp_path: Path) -> None:
    config = override(Config(), {"method": "nn-pixel"})
    path = compare.write_untrained("nn-pixel", config, tmp_path).checkpoint
    assert path.is_file()
    from metalstm import load_method

    model, meta = load_method(path)
    assert model.name == "nn-pixel" and meta["kind"] == "untrained"


def test_training_cost_is_read_from_the_training_state_and_unknown_where_not_recorded() -> None:
    here = describe(torch.device("cpu"))
    full = {"elapsed": 70.5, "cpu_seconds": 69, "machines": ["EPYC; 1 thread", here]}
    assert Cost.of(full) == Cost(70.5, 69.0, ("EPYC; 1 thread", here))
    # A checkpoint from before CPU time was recorded: wall time only.
    assert Cost.of({"step": 3, "elapsed": 12.0}) == Cost(12.0, None, ())
    # Resumed from such a checkpoint: CPU time of part of the run only, so not given.
    assert Cost.of({"elapsed": 9.0, "cpu_seconds": 4.0, "machines": [UNRECORDED, here]}) == Cost(
        9.0, None, ()
    )
    assert Cost.of(None) == Cost.of([1]) == Cost()


def test_notes_name_a_learner_other_than_the_presets() -> None:
    base = override(load_preset("omniglot-5w1s"), {"filters": 8})
    trained = Trained(Path("unused"), Cost(), "trained")
    for method, downsample, named in [("maml", "stride", True), ("protonet", "pool", False)]:
        model = build_method(override(base, {"method": method, "downsample": downsample}))
        protocol = protocol_for(model, model.config, "test", 6, 0)
        notes = method_notes(model, trained, protocol, base)
        assert ("learner: stride-2 convolutions, features averaged" in notes) is named, notes


def test_train_method_trains_what_compare_trains(data_env: Path, tmp_path: Path) -> None:
    """``train --method maml`` on the 20-way preset: Finn et al.'s recipe (20-way episodes of K
    queries, their strided learner), not the preset's 100-way meta-learner episodes; the same
    config as ``compare``'s for that method."""
    small = ["--set", "filters=8", "--set", "val_episodes=1", "--set", "val_interval=1000"]
    small += ["--set", "inner_lr=0.2"]  # one of MAML's own settings
    run = tmp_path / "run"
    argv = ["train", "--preset", "omniglot-20w1s", "--method", "maml", "--out", str(run)]
    assert cli.main([*argv, "--episodes", "2", "--quiet", *small]) == 0
    saved = Config.from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    compared = compare_config("omniglot-20w1s", "maml", *small)
    assert saved == override(compared, {"episodes": 2, "data_root": saved.data_root})
    assert (saved.train_ways, saved.q_query, saved.downsample) == (20, 1, "stride")
    assert saved.to_dict()["settings"]["inner_lr"] == 0.2
    assert cli.main(["train", "--resume", str(run), "--method", "maml"]) == 2  # the run's own
