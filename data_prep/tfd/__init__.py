"""TFD as a TFDS dataset: ``tfd_tml``. Importing this registers it.

``reader`` loads and checks ``TFD_48x48.mat`` into plain records (usable
outside TFDS); ``builder`` holds the ``TfdTml`` GeneratorBasedBuilder (see
its docstring for how to build).
"""
from __future__ import annotations

from data_prep.tfd.builder import TfdTml
from data_prep.tfd.reader import EMOTION_NAMES, SPLITS

__all__ = ["TfdTml", "EMOTION_NAMES", "SPLITS"]
