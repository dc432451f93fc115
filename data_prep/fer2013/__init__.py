"""FER2013 as a TFDS dataset: ``fer2013_tml``. Importing this registers it.

``reader`` reads the csv / zip / image folder into plain records (usable
outside TFDS); ``builder`` holds the ``Fer2013Tml`` GeneratorBasedBuilder (see
its docstring for how to build).
"""
from __future__ import annotations

from data_prep.fer2013.builder import Fer2013Tml
from data_prep.fer2013.reader import EMOTION_NAMES, SPLITS

__all__ = ["Fer2013Tml", "EMOTION_NAMES", "SPLITS"]
