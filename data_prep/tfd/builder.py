"""TFDS builder for the Toronto Face Database: ``tfd_tml`` (array_record).

Named ``tfd_tml`` so it can never be confused with a ``tfd`` builder from
another catalogue. Importing ``data_prep.tfd`` registers it. The input is
``TFD_48x48.mat`` (see data_prep/tfd/reader.py for its layout and the
orientation we assume), obtained from the database's authors.

Splits:
  labelled    the 4,178 images with an expression label, each with its
              ``folds`` row; fold k's train / valid / test sets are
              ``folds[k] == 1 / 2 / 3`` (0 = not used in fold k). The input
              pipeline does this selection.
  unlabelled  ``labs_ex == -1``; ``emotion`` is stored as -1.

Features: the shared schema of data_prep/expression_common.py (``emotion``
names anger, disgust, fear, happy, sad, surprise, neutral = labs_ex 1..7)
plus ``identity`` (int32, labs_id) and ``folds`` ((5,) int8).

Configs ``images`` (default) and ``dlib68`` (landmarks joined by id
``tfd_<row>`` from ``python -m data_prep.label68 --tfd=TFD_48x48.mat``).

  import tensorflow_datasets as tfds
  import data_prep.tfd  # registers tfd_tml

  builder = tfds.builder("tfd_tml", data_dir=DATA_DIR,
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/path/with/TFD_48x48.mat"))
  labelled = builder.as_data_source("labelled")

Options (constructor keywords): ``source`` (the .mat), ``landmarks_file``,
``skip_bad``, ``transpose_images`` (for a copy stored images(n, col, row)).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep import expression_common as common
from data_prep.tfd import reader


class TfdTml(common.ExpressionBuilder):
  """TFD 48x48 faces, 7 expressions, 5 official folds, optional landmarks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: TFD_48x48.mat."}
  DATASET = "TFD"
  LANDMARKS_NAME = "tfd_landmarks.npz"
  BUILDER_CONFIGS = common.builder_configs(DATASET, LANDMARKS_NAME)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put {reader.MAT_NAME} (MATLAB v5: images N x 48 x 48 uint8, labs_ex,
  labs_id, folds N x 5) in manual_dir, or pass source=<path>. For config
  dlib68 also {LANDMARKS_NAME} from
  `python -m data_prep.label68 --tfd=... --out=...` (or landmarks_file=).
  """

  def __init__(self, *, transpose_images: bool = False, **kwargs):
    self._transpose_images = transpose_images
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.features(reader.EMOTION_NAMES, extra={
            "identity": tfds.features.Tensor(shape=(), dtype=np.int32),
            "folds": tfds.features.Tensor(shape=(reader.NUM_FOLDS,),
                                          dtype=np.int8,
                                          encoding=common.BYTES),
        }),
        supervised_keys=("image", "emotion"),
        homepage="http://aclab.ca/users/josh/TFD.html",
        metadata=tfds.core.MetadataDict(),
        citation="""@techreport{susskind2010tfd,
  title={The Toronto Face Database},
  author={Susskind, Joshua M. and Anderson, Adam K. and Hinton, Geoffrey E.},
  institution={University of Toronto}, number={TR-2010-001}, year={2010}}""")

  def _split_generators(self, dl_manager):
    source = self._source or os.path.join(os.fspath(dl_manager.manual_dir),
                                          reader.MAT_NAME)
    join = self._prepare_build(dl_manager, source)
    self.info.metadata["transpose_images"] = self._transpose_images
    data = reader.load_mat(source, transpose_images=self._transpose_images)
    labelled = int(np.sum(data.labs_ex != reader.UNLABELLED))
    if labelled != reader.NUM_LABELLED:
      logging.warning("%s: %d labelled images; the official TFD_48x48.mat "
                      "has %d", source, labelled, reader.NUM_LABELLED)
    has = {reader.SPLITS[0]: labelled,
           reader.SPLITS[1]: len(data.labs_ex) - labelled}
    # TFDS cannot write an empty split (e.g. a file without unlabelled faces).
    return {split: self._generate_examples(data, split, join)
            for split in reader.SPLITS if has[split]}

  def _generate_examples(self, data, split, join):
    policy = self._policy(split)
    records = ((r.id, dict(image=r.image, emotion=r.emotion,
                           identity=np.int32(r.identity), folds=r.folds))
               for r in reader.records(data, splits=[split], policy=policy))
    yield from self._examples(split, records, policy, join)
