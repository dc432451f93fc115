"""TFDS builder for FER2013: ``fer2013_tml`` (array_record, manual download).

Registered as ``fer2013_tml``, not ``fer2013``, so that ``tfds.builder`` and
``tfds.data_source`` always pick this builder and never a ``fer2013`` from
another catalogue (community or Hugging Face namespaces, other TFDS
releases) with a different schema. Importing ``data_prep.fer2013`` registers
it.

Splits: ``train`` (Usage Training, 28,709), ``public_test`` (PublicTest,
3,589), ``private_test`` (PrivateTest, 3,589). Features: see
data_prep/expression_common.py; ``emotion`` names are FER's own, in FER's
order (0=angry 1=disgust 2=fear 3=happy 4=sad 5=surprise 6=neutral).

Configs: ``images`` (default; no landmarks) and ``dlib68`` (landmarks from
``python -m data_prep.label68``, joined by id; ``has_landmarks`` False where
the detector found no face).

  import tensorflow_datasets as tfds
  import data_prep.fer2013  # registers fer2013_tml

  builder = tfds.builder("fer2013_tml/dlib68", data_dir=DATA_DIR,
                         file_format="array_record",
                         landmarks_file="/path/fer2013_landmarks.npz")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/path/with/fer2013_images.zip"))
  train = builder.as_data_source("train")   # no TensorFlow needed

Builder options (constructor keywords, also through ``tfds.data_source(...,
builder_kwargs=...)``): ``source`` (a csv, zip or folder; default: looked up
in manual_dir), ``landmarks_file``, ``skip_bad``.
"""
from __future__ import annotations

import logging

import tensorflow_datasets as tfds

from data_prep import expression_common as common
from data_prep.fer2013 import reader


class Fer2013Tml(common.ExpressionBuilder):
  """FER2013 48x48 faces, 7 expressions, optional 68-point landmarks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: csv, image folder or zip."}
  DATASET = "FER2013"
  LANDMARKS_NAME = "fer2013_landmarks.npz"
  BUILDER_CONFIGS = common.builder_configs(DATASET, LANDMARKS_NAME)
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Put ONE of these in manual_dir (looked for in this order):
    {', '.join(reader.SOURCE_NAMES)}
  i.e. the Kaggle "Challenges in Representation Learning: Facial Expression
  Recognition" fer2013.csv (optionally gzipped), or the image-folder layout
  train/<class>/Training_<n>.jpg and
  test/<class>/{{PublicTest,PrivateTest}}_<n>.jpg as a zip or a folder; or
  pass source=<path>. For config dlib68 also {LANDMARKS_NAME} from
  `python -m data_prep.label68` (or landmarks_file=).
  """

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=common.features(reader.EMOTION_NAMES),
        supervised_keys=("image", "emotion"),
        homepage=("https://www.kaggle.com/c/challenges-in-representation-"
                  "learning-facial-expression-recognition-challenge"),
        metadata=tfds.core.MetadataDict(),
        citation="""@inproceedings{goodfellow2013challenges,
  title={Challenges in representation learning: A report on three machine
         learning contests},
  author={Goodfellow, Ian J. and others},
  booktitle={ICONIP}, year={2013}}""")

  def _split_generators(self, dl_manager):
    source = self._source or reader.find_source(dl_manager.manual_dir)
    join = self._prepare_build(dl_manager, source)
    counts = reader.split_counts(source)
    if not counts:
      # Nothing to build: say why (an empty file, a wrong header) rather than
      # let TFDS write a dataset with no splits that reads as prepared.
      reader.check_has_records(source)
    # TFDS cannot write an empty split; a partial source (the csv head, a
    # test-only folder) builds the splits it has and says so.
    missing = [s for s in reader.SPLITS if not counts[s]]
    if missing:
      logging.warning("%s has no records for split(s) %s; building only %s",
                      source, missing, [s for s in reader.SPLITS if counts[s]])
    return {split: self._generate_examples(source, split, join)
            for split in reader.SPLITS if counts[split]}

  def _generate_examples(self, source, split, join):
    policy = self._policy(split)
    records = ((r.id, dict(image=r.image, emotion=r.emotion))
               for r in reader.read(source, splits=[split], policy=policy))
    yield from self._examples(split, records, policy, join)
