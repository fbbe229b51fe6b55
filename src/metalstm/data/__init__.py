"""Data: image sources, fixed class splits, and deterministic N-way K-shot episodes.

* :func:`load_split` loads one part of a dataset split as :class:`ClassImages` (uint8, in memory):
  Omniglot (``vinyals`` / ``lake`` splits), miniImageNet (Ravi layout) or any ImageFolder.
* :class:`EpisodeSampler` draws :class:`Episode` objects as pure functions of (seed, step, slot);
  :func:`fixed_episodes` is the fixed evaluation list every method is scored on.
"""

from .episodes import (
    Episode,
    EpisodeDigest,
    Episodes,
    EpisodeSampler,
    FixedEpisodes,
    episode_loader,
    episodes_fingerprint,
    fixed_episodes,
)
from .images import ClassImages, load_image_folder, load_images
from .omniglot import LAKE_VAL_ALPHABETS, omniglot_counts
from .sources import load_split
from .storage import resolve_data_root

__all__ = [
    "LAKE_VAL_ALPHABETS",
    "ClassImages",
    "Episode",
    "EpisodeDigest",
    "EpisodeSampler",
    "Episodes",
    "FixedEpisodes",
    "episode_loader",
    "episodes_fingerprint",
    "fixed_episodes",
    "load_image_folder",
    "load_images",
    "load_split",
    "omniglot_counts",
    "resolve_data_root",
]
