"""A method registered from the test suite alone (no edit of the package) runs through
``train``, ``evaluate`` and ``compare`` like the built-in ones: the registry is the only place
that knows a method."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from conftest import run_cli
from metalstm import Config, load_method, override
from metalstm.data import Episode
from metalstm.errors import ConfigError
from metalstm.methods.base import NO_BATCHNORM, Classifier, EpisodeLoss, Method, accuracy
from metalstm.registry import MethodSettings, method_entry, method_names, register, unregister

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "toy-centroid"


@dataclass(frozen=True)
class ToySettings(MethodSettings):
    """The toy's own settings: the initial scale of its logits."""

    initial_scale: float = 1.0
    aliases: ClassVar[dict[str, str]] = {"toy_scale": "initial_scale"}

    def checks(self) -> dict[str, bool]:
        return {"initial_scale": self.initial_scale > 0}


def toy_recipe(config: Config) -> dict[str, Any]:
    return {"lr": 0.05, "clip_grad_norm": 5.0}


class ToyCentroid(Method):
    """Nearest class mean in pixel space, logits −s·||x − μ_k||², with a meta-learned scale s."""

    settings: ToySettings

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.log_scale = nn.Parameter(torch.tensor(self.settings.initial_scale).log())

    def logits(self, support_x: Tensor, support_y: Tensor, query_x: Tensor) -> Tensor:
        support, query = support_x.flatten(1), query_x.flatten(1)
        means = torch.stack([support[support_y == k].mean(0) for k in range(self.config.n_way)])
        return -self.log_scale.exp() * torch.cdist(query, means).pow(2) / support.shape[1]

    def meta_loss(self, episode: Episode) -> EpisodeLoss:
        logits = self.logits(episode.support_x, episode.support_y, episode.query_x)
        return EpisodeLoss(
            F.cross_entropy(logits, episode.query_y), accuracy(logits, episode.query_y)
        )

    def adapt(self, support_x: Tensor, support_y: Tensor) -> Classifier:
        return lambda query_x: self.logits(support_x, support_y, query_x)

    def adaptation(self) -> str:
        return f"scale {self.log_scale.exp().item():.3g}"

    def test_batchnorm(self) -> str:
        return NO_BATCHNORM


@pytest.fixture
def toy() -> Iterator[type[Method]]:
    cls = register(
        NAME,
        title="Toy nearest centroid",
        settings=ToySettings,
        recipe=toy_recipe,
        published={("omniglot", 5, 1): 50.0},
    )(ToyCentroid)
    try:
        yield cls
    finally:
        unregister(NAME)
    assert NAME not in method_names()


SMALL = ["--set", "q_query=5", "--set", "val_episodes=3", "--set", "val_interval=1000"]


def test_a_plugin_method_trains_evaluates_and_compares(
    toy: type[Method], data_env: Path, tmp_path: Path
) -> None:
    assert method_names()[-1] == NAME and method_entry(NAME).cls is ToyCentroid
    code, out, _ = run_cli(["methods", "--json"])
    listed = json.loads(out)[NAME]
    assert code == 0 and listed["settings"] == {"initial_scale": 1.0}
    assert listed["trains_on"] == "episodes" and listed["title"] == "Toy nearest centroid"
    run = tmp_path / "run"
    train = ["train", "--preset", "omniglot-5w1s", "--out", str(run), "--episodes", "20"]
    # the preset meta-trains the meta-learner on 20-way episodes; the toy has a 5-way head
    toy_set = ["--set", "method=toy-centroid", "--set", "toy_scale=2", "--set", "train_n_way=5"]
    code, _, err = run_cli([*train, *toy_set, *SMALL])
    assert code == 0, err
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"] == NAME and saved["settings"] == {"initial_scale": 2.0}
    model, meta = load_method(run / "best")
    assert isinstance(model, ToyCentroid) and meta["algorithm"] == NAME
    assert model.log_scale.item() != pytest.approx(torch.tensor(2.0).log().item())  # trained

    code, out, err = run_cli(["evaluate", "--checkpoint", str(run / "best"), "--episodes", "4"])
    assert code == 0, err
    assert out.startswith("accuracy: ") and "scale " in out and "BN: none" in out

    compared = tmp_path / "compare"
    compare = ["compare", "--preset", "omniglot-5w1s", "--methods", f"nn-pixel,{NAME}"]
    compare += ["--out", str(compared), "--episodes", "4", "--train-episodes", "10", "--quiet"]
    code, out, err = run_cli([*compare, *SMALL, "--json"])
    assert code == 0, err
    rows = {row["method"]: row for row in json.loads(out)["methods"]}
    assert list(rows) == ["nn-pixel", NAME]  # registration order
    assert rows[NAME]["title"] == "Toy nearest centroid" and rows[NAME]["published"] == 50.0
    assert (
        rows[NAME]["episodes"] == 4 and rows[NAME]["fingerprint"] == rows["nn-pixel"]["fingerprint"]
    )
    recipe = yaml.safe_load((compared / "runs" / NAME / "config.yaml").read_text())
    assert recipe["lr"] == 0.05 and recipe["clip_grad_norm"] == 5.0 and recipe["episodes"] == 10


def test_a_plugin_methods_settings_are_its_own(toy: type[Method], tmp_path: Path) -> None:
    config = override(Config(), {"method": NAME, "initial_scale": 3.0})
    assert config.settings == ToySettings(3.0)
    assert Config.from_dict(config.to_dict()) == config
    assert override(config, {"settings.initial_scale": 4.0}).settings == ToySettings(4.0)
    with pytest.raises(ConfigError, match=r"invalid value initial_scale=-1\.0"):
        override(config, {"toy_scale": -1})
    with pytest.raises(ConfigError, match="initial_scale is a setting of toy-centroid"):
        override(Config(), {"initial_scale": 2})  # the meta-learner has no such setting
    train = ["train", "--preset", "omniglot-5w1s", "--out", str(tmp_path / "run")]
    code, _, err = run_cli([*train, "--set", "method=toy-centroid", "--set", "toy_scale=0"])
    assert code == 2 and "invalid value initial_scale=0.0" in err
    assert not (tmp_path / "run").exists()
