"""The one frozen run configuration.

``experiments/run.py`` turns absl flags into a :class:`Config`; nothing in
``tml`` reads global flags. Field names equal flag names, so a validation
error can name the flag the user has to fix.
"""
from __future__ import annotations

import dataclasses
from typing import Any


class ConfigError(ValueError):
  """A config value that cannot work; the message starts with ``--<flag>``."""


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs. Defaults are the Chu & Liu protocol.

  Loss weights: 0 switches a term off. Stage 1 (when ``stage1_epochs`` > 0)
  trains only the U-Net (params under ``'unet'``) on the unet loss; stage 2
  trains everything on landmark + emotion (+ maps) with the weights below.
  """
  # --- data -----------------------------------------------------------------
  dataset: str = "synthetic_thermal"
  dataset_config: str = ""           # TFDS builder config name ("" = default)
  data_dir: str = "~/tensorflow_datasets"
  manual_dir: str = ""
  landmarks_file: str = ""           # fer2013/tfd config dlib68: label68 output
  rebuild: bool = False              # delete the prepared dataset and build it again from --manual_dir
  # Bad records in --manual_dir: skip and count them (any dataset) instead of
  # stopping the build. Kopaczka frames with null points: "error" (stop),
  # "skip" (drop the frame) or "mask" (keep it for the emotion task; its
  # points leave every landmark loss and metric). Recorded with the build.
  skip_bad: bool = False
  missing_points: str = "error"
  image_size: int = 128              # N: network input (thermal crops resized)
  splits: tuple[int, ...] = (0, 1, 2, 3, 4)   # Chu protocol repeats / TFD folds
  # Which parameters are reported, and on what. ``selection``: "auto" (FER2013
  # -> public_test, TFD -> valid, thermal -> last), "last" (the final
  # parameters of a fixed schedule), "public_test" (FER2013), "valid" (TFD), or
  # "holdout" (a stratified ``holdout_fraction`` of the training set, removed
  # from training). ``test_sets``: comma-separated reported sets, "auto" or
  # any of private_test, public_test, public_private (the 7,178 images of
  # both, the paper's "7177 image test set"), test (thermal, TFD). A reported
  # set may not overlap the selection set. With a selection set the final
  # parameters are evaluated too (results ``evaluations``, ``last/<set>``):
  # they never depend on it, so ``last/public_private`` is the fixed-schedule
  # result on the paper's test set.
  selection: str = "auto"
  holdout_fraction: float = 0.1
  holdout_seed: int = 0              # fixed, so every run holds out the same images
  test_sets: str = "auto"
  # Thermal: "per_image" (the paper: per emotion 1/8 of the frames test) or
  # "subject" (1/8 of the subjects test, none of their frames train).
  thermal_split: str = "per_image"
  # A fixed subset of the training images (0 = all): per emotion the same
  # share of each split's training set, drawn once with ``holdout_seed`` so
  # every row and seed trains on the same images (reduced CPU schedules).
  train_limit: int = 0
  # --- model ----------------------------------------------------------------
  model: str = "chu_unet"
  unet_depth: int = 4
  unet_width: int = 64
  fc_width: int = 1024
  map_reduction: int = 1
  emotion_head: bool = True
  landmark_head: bool = True
  map_head: bool = True              # DeVries landmark-map head
  dropout: float = 0.5
  compute_dtype: str = "float32"
  # "jax" (the jitted shard_map step) or "torch" (the PyTorch twins trained by
  # the same loop from the same init and batches: tml.torch.trainer).
  framework: str = "jax"
  # --- loss -----------------------------------------------------------------
  unet_weight: float = 1.0           # stage-1 weight of Chu Eq. 2
  landmark_weight: float = 1.0
  emotion_weight: float = 1.0
  emotion_loss: str = "mse"          # "mse" (paper) or "xent"
  map_weight: float = 1.0            # DeVries lambda
  brow_width: float = 1.0
  # --- early stopping of the emotion task (Chu Eq. 4) -----------------------
  # E(i) is the mean training emotion loss of epoch i ("epoch", k in epochs)
  # or of step i ("step", k in steps; noise-dominated, kept as an option).
  early_stopping_k: int = 0          # 0 = off
  early_stopping_epsilon: float = 0.0
  early_stopping_unit: str = "epoch"
  # --- optimisation ---------------------------------------------------------
  optimizer: str = "adam"            # "adam" (Chu) or "sgd" (DeVries, momentum)
  learning_rate: float = 1e-4        # peak rate of the schedule
  # Schedule over each stage: linear warm-up from 0 over ``warmup_epochs``,
  # then "constant", "cosine" (to ``lr_final_fraction`` x peak at the end of
  # the stage) or "step" (x ``lr_step_factor`` every ``lr_step_epochs``).
  lr_schedule: str = "constant"
  warmup_epochs: float = 0.0
  lr_final_fraction: float = 0.0
  lr_step_epochs: int = 0
  lr_step_factor: float = 0.1
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 0.0
  batch_size: int = 32               # global, over all devices and hosts
  eval_batch_size: int = 64
  stage1_epochs: int = 40
  stage2_epochs: int = 60
  max_steps_per_stage: int = 0       # 0 = no cap (for smoke tests)
  # --- augmentation ---------------------------------------------------------
  augment: bool = False
  crop_size: int = 42
  max_shift: float = 3.0
  max_rotate_deg: float = 45.0
  max_zoom: float = 1.2
  flip: bool = True
  integer_shift: bool = True         # whole-pixel shifts (the 48 -> 42 random crop)
  ten_crop: bool = False
  # --- run ------------------------------------------------------------------
  seed: int = 0
  workdir: str = "runs/chu"
  log_every_steps: int = 20
  checkpoint_every_steps: int = 200
  keep_checkpoints: int = 3
  eval_every_epochs: int = 0         # 0 = evaluate at the end of each stage
  monitor_every_steps: int = 0       # time to accuracy (tml.monitor); 0 = off
  monitor_bare_steps: int = 0        # tml.monitor: bare-step timing; 0 = off
  num_plot_images: int = 16
  multihost: bool = False
  coordinator_address: str = ""
  num_processes: int = 0
  process_id: int = -1

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["splits"] = list(self.splits)
    return d

  def replace(self, **kw) -> "Config":
    return dataclasses.replace(self, **kw)

  @property
  def two_stage(self) -> bool:
    return self.stage1_epochs > 0

  @property
  def early_stopping(self) -> bool:
    return self.early_stopping_k > 0


_CHOICES = {
    "emotion_loss": ("mse", "xent"),
    "optimizer": ("adam", "sgd"),
    "compute_dtype": ("float32", "bfloat16"),
    "framework": ("jax", "torch"),
    "early_stopping_unit": ("epoch", "step"),
    "lr_schedule": ("constant", "cosine", "step"),
    "selection": ("auto", "last", "public_test", "valid", "holdout"),
    "thermal_split": ("per_image", "subject"),
    "missing_points": ("error", "skip", "mask"),
}
TEST_SETS = ("test", "private_test", "public_test", "public_private", "holdout")


# The kind of dataset ("thermal": Chu, "expression": DeVries) each model is
# built for: its input size and heads follow that kind's protocol.
MODEL_DATA_KINDS = {"chu_unet": "thermal", "basic_cnn": "thermal",
                    "devries": "expression"}


def validate(cfg: Config, *, known_models=(), known_datasets=(),
             dataset_kinds=None, num_devices=None) -> Config:
  """Raises ConfigError naming the flag for any value that cannot work.

  Args:
    cfg: the config.
    known_models, known_datasets: registered names (unchecked when empty).
    dataset_kinds: ``{dataset: "thermal" | "expression"}``; with it a model
      on the wrong kind of dataset is refused (MODEL_DATA_KINDS).
    num_devices: all devices of all processes; with it the global batch
      sizes must divide evenly over them.
  """
  def bad(flag, msg):
    raise ConfigError(f"--{flag}={getattr(cfg, flag)!r}: {msg}")

  for flag, choices in _CHOICES.items():
    if getattr(cfg, flag) not in choices:
      bad(flag, f"expected one of {', '.join(choices)}")
  if known_models and cfg.model not in known_models:
    bad("model", f"unknown model; known: {', '.join(sorted(known_models))}")
  if known_datasets and cfg.dataset not in known_datasets:
    bad("dataset", f"unknown dataset; known: {', '.join(sorted(known_datasets))}")
  for flag in ("image_size", "batch_size", "eval_batch_size", "unet_width",
               "fc_width", "map_reduction", "log_every_steps",
               "checkpoint_every_steps", "keep_checkpoints", "crop_size"):
    if getattr(cfg, flag) <= 0:
      bad(flag, "expected a positive integer")
  for flag in ("stage1_epochs", "stage2_epochs", "max_steps_per_stage",
               "early_stopping_k", "eval_every_epochs", "monitor_every_steps",
               "monitor_bare_steps"):
    if getattr(cfg, flag) < 0:
      bad(flag, "expected a non-negative integer")
  if cfg.stage1_epochs + cfg.stage2_epochs == 0:
    bad("stage2_epochs", "both stages have 0 epochs: nothing to train")
  if cfg.learning_rate <= 0:
    bad("learning_rate", "expected a positive number")
  if not 0 <= cfg.dropout < 1:
    bad("dropout", "expected 0 <= dropout < 1")
  if cfg.model == "chu_unet" and cfg.image_size % (2 ** cfg.unet_depth):
    bad("image_size", f"must be divisible by 2**unet_depth = {2 ** cfg.unet_depth}")
  if cfg.model == "chu_unet" and cfg.image_size % cfg.map_reduction:
    bad("map_reduction", f"must divide --image_size={cfg.image_size}")
  if cfg.stage1_epochs > 0 and cfg.model != "chu_unet":
    bad("stage1_epochs", f"two-stage training needs --model=chu_unet (a U-Net), "
        f"not {cfg.model!r}; use --stage1_epochs=0")
  if not cfg.splits:
    bad("splits", "expected at least one split index")
  if cfg.early_stopping_k == 1:
    bad("early_stopping_k", "needs k >= 2 (a median over k+1 >= 3 values)")
  for flag in ("landmark_weight", "emotion_weight", "unet_weight", "map_weight"):
    if getattr(cfg, flag) < 0:
      bad(flag, "expected a non-negative weight")
  if cfg.test_sets != "auto":
    names = [t.strip() for t in cfg.test_sets.split(",")]
    unknown = [t for t in names if t not in TEST_SETS]
    if unknown or not names:
      bad("test_sets", f"expected 'auto' or a comma list of {', '.join(TEST_SETS)}")
    if cfg.selection == "public_test" and (
        "public_test" in names or "public_private" in names):
      bad("test_sets", "overlaps the selection set (--selection=public_test); "
          "report private_test, or select with --selection=holdout or last")
  if cfg.train_limit < 0:
    bad("train_limit", "expected 0 (all training images) or a positive count")
  if not 0 < cfg.holdout_fraction < 1:
    bad("holdout_fraction", "expected 0 < fraction < 1")
  if cfg.warmup_epochs < 0:
    bad("warmup_epochs", "expected a non-negative number of epochs")
  if not 0 <= cfg.lr_final_fraction <= 1:
    bad("lr_final_fraction", "expected a fraction in [0, 1]")
  if cfg.lr_schedule == "step" and cfg.lr_step_epochs <= 0:
    bad("lr_step_epochs", "--lr_schedule=step needs a positive step interval")
  kind = (dataset_kinds or {}).get(cfg.dataset)
  wanted = MODEL_DATA_KINDS.get(cfg.model)
  if kind and wanted and kind != wanted:
    models = sorted(m for m, k in MODEL_DATA_KINDS.items() if k == kind)
    datasets = sorted(d for d, k in dataset_kinds.items() if k == wanted)
    bad("model", f"is built for {wanted} datasets ({', '.join(datasets)}), "
        f"but --dataset={cfg.dataset} is a {kind} dataset; use "
        f"--model={' or --model='.join(models)}")
  if num_devices:
    for flag in ("batch_size", "eval_batch_size"):
      if getattr(cfg, flag) % num_devices:
        bad(flag, f"the global batch must be divisible by the number of "
            f"devices ({num_devices}); use a multiple of {num_devices}")
  return cfg
