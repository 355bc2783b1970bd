"""CromSS pretraining on SSL4EO-S12 + Dynamic World noisy labels (paper defaults,
docs/METHOD.md §2-§5).

Run:  python -m cromss_jax.main --config=configs/pretrain.py --workdir=DIR \
          --config.data.dataset_dir=/path/to/converted/ssl4eo_s12_nol
Any field can be overridden from the command line, e.g. --config.objective.keep_ratio=0.3.

Variants (big_vision style, `--config=configs/pretrain.py:NAME`): the same method at a smaller
scale, so that no caller has to change the scale in code.
  (none)  the paper's settings.
  demo    `make demo` (configs/demo.py): ResNet-18, 128 px crops, float32, 6 epochs x 10 steps.
  study   the noise-robustness study's default scale: the demo at 96 px, 8 epochs x 10 steps.
  tiny    the smallest real run (tests, smoke checks): 64 px crops, batch 2, 3 epochs x 2 steps.
Every key lives here with its meaning; cromss_jax/config_validation.py holds the allowed values.
"""
from __future__ import annotations

from typing import Any

import ml_collections

# Variant -> {dotted key: value}, applied in order on top of the paper's config; a variant may
# start from another ('_base').
VARIANTS: dict[str, dict[str, Any]] = {
    'demo': {
        'data.crop_size': 128,
        'model.encoder': 'resnet18',
        'model.compute_dtype': 'float32',
        'objective.ramp_epochs': 4,          # the paper's ramp (80 of 200 epochs), compressed
        'training.num_epochs': 6,
        'training.global_batch_size': 8,
        # 22 training locations make 2 batches; 10 steps per epoch (the split repeats within an
        # epoch) give BatchNorm's running statistics time to settle before each evaluation.
        'training.steps_per_epoch': 10,
        'optimizer.learning_rate': 1e-3,     # the paper's 5e-3 is for batch 128
        'training.checkpoint_every_epochs': 2,
        'training.log_every_steps': 2,
        'training.panel_every_epochs': 3,
        'schedule.patience': 2,
    },
    'study': {
        '_base': 'demo',
        'data.crop_size': 96,
        'objective.ramp_epochs': 3,          # 0.4 of the epochs, as the paper's 80 of 200
        'training.num_epochs': 8,
        'training.checkpoint_every_epochs': 4,
        'training.keep_checkpoints': 1,
        'training.log_every_steps': 10,
        'training.panel_every_epochs': 0,
    },
    'tiny': {
        '_base': 'demo',
        'data.crop_size': 64,
        'training.global_batch_size': 2,
        'training.steps_per_epoch': 2,
        'training.num_epochs': 3,
        'training.checkpoint_every_epochs': 1,
        'training.log_every_steps': 1,
        'training.panel_every_epochs': 0,
    },
}


def apply_variant(config: ml_collections.ConfigDict, variants: dict[str, dict[str, Any]],
                  name: str | None) -> ml_collections.ConfigDict:
  """`config` with the dotted-key settings of variant `name` (None or '' = unchanged)."""
  if not name:
    return config
  if name not in variants:
    raise ValueError(f'unknown config variant {name!r}; expected one of '
                     f'{", ".join(map(repr, sorted(variants)))} (or none).')
  settings = dict(variants[name])
  config = apply_variant(config, variants, settings.pop('_base', None))
  for path, value in settings.items():
    *sections, key = path.split('.')
    node = config
    for section in sections:
      node = node[section]
    if key not in node:
      raise KeyError(f'variant {name!r} sets {path}, which is not a config key')
    node[key] = value
  return config


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The paper's pretraining config, or one of VARIANTS (`configs/pretrain.py:tiny`)."""
  config = ml_collections.ConfigDict()
  config.seed = 42                    # model init, data order and augmentation

  # --- Data (docs/METHOD.md §2) ---------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # Directory written by `python -m data_prep.ssl4eo` (loadable by tfds.builder_from_directory).
  data.dataset_dir = ''         # required: set on the command line
  data.s2_bands = 13            # 13 = all, 12 = drop B10, 9 = [1..7,11,12], 3 = RGB (B4,B3,B2)
  data.tile_size = 264          # stored tiles (10 m grid); must match the records
  data.crop_size = 256          # random crop for training; centre crop for validation
  data.flip = True              # independent horizontal / vertical flips, p = 0.5 each
  data.rotation = 'free'        # 'free' (paper: any angle in [-90, 90]), 'rot90', or 'none'
  data.rotation_prob = 0.2      # probability of rotating a sample (the paper's 0.2)
  # Image resampling of the free rotation: 'bilinear' or 'nearest' (labels are always nearest).
  data.image_interpolation = 'bilinear'
  # The training crop, flips and rotation run inside the compiled train step (augment.py); the
  # host reads whole tiles of one (location, season) record each, with random access (grain).
  # Reader processes (grain workers) making batches ahead of the step; 0 = `prefetch` threads of
  # the training process, which is faster here (array_record reads release the GIL, and
  # processes must copy each batch through shared memory; docs/PERFORMANCE.md).
  data.num_workers = 0
  # Batches read ahead: pretraining, per host (grain; with num_workers=0 one thread each;
  # -1 = 2); transfer, per tf.data pipeline (-1 = tf.data.AUTOTUNE).
  data.prefetch = 2

  # --- Model (docs/METHOD.md §3) --------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.encoder = 'resnet50'    # resnet18 | resnet34 | resnet50
  model.fusion = 'mid'          # mid: shared decoder, late: two U-Nets
  model.decoder_channels = (256, 128, 64, 32, 16)   # U-Net decoder blocks, deepest first
  model.s1_channels = 2         # VV, VH; must match the records
  model.compute_dtype = 'bfloat16'   # bfloat16 (accelerators) | float32; parameters stay float32

  # --- Objective (docs/METHOD.md §4; keys fixed by the contract of §4.13) -----------------
  config.objective = obj = ml_collections.ConfigDict()
  obj.num_classes = 9                 # Dynamic World classes; must match the dataset
  obj.seg_losses = ('ce', 'dice')     # any of 'ce', 'dice', 'focal'
  obj.consistency = 'ce'              # ce | kl | mse | none
  obj.consistency_weight = 1.0        # lambda of the cross-modal consistency term
  obj.label_smoothing = True          # soften the noisy labels with the prior (and uniform)
  obj.smoothing_factors = (0.15, 0.05)  # (prior factor a, uniform factor b); (a,) = prior only
  obj.prior_type = 'ts'               # ts | t | s (temporal-spatial, temporal, spatial)
  obj.prior_sigma = 3.0               # Gaussian filter of the prior, in pixels
  obj.prior_truncate = 4.0            # filter radius in sigmas (12 px)
  obj.sample_selection = True         # class-balanced label selection + consistency weights
  obj.confidence = 'entropy'          # entropy | gini
  obj.ramp = 'exp'                    # exp | linear | none
  obj.ramp_epochs = 80                # epochs of the ramp (0 = no ramp)
  obj.keep_ratio = 0.5                # share of pixels per class kept after the ramp

  # --- Optimiser and LR schedule (docs/METHOD.md §5) ------------------------------------------
  config.optimizer = opt = ml_collections.ConfigDict()
  opt.name = 'adam'             # the only optimiser
  opt.learning_rate = 5e-3      # peak / initial learning rate (0 < lr <= 1)
  opt.weight_decay = 1e-8       # coupled L2, added to the gradient before Adam (torch.optim.Adam)
  opt.b1 = 0.9                  # Adam's first-moment decay, in [0, 1)
  opt.b2 = 0.999                # Adam's second-moment decay, in [0, 1)
  opt.eps = 1e-8                # Adam's denominator epsilon (> 0)

  config.schedule = sched = ml_collections.ConfigDict()
  sched.name = 'plateau'        # plateau (reduce on validation loss) | constant | cosine
  sched.factor = 0.5            # plateau: learning-rate factor on a plateau, in (0, 1)
  sched.patience = 30           # plateau: epochs without improvement before reducing
  sched.rel_threshold = 1e-4    # plateau: relative improvement that counts
  sched.min_lr = 0.0            # floor of the plateau reductions / end of the cosine

  # --- Training loop ---------------------------------------------------------------------------
  config.training = train = ml_collections.ConfigDict()
  train.num_epochs = 200               # epochs of steps_per_epoch steps
  train.global_batch_size = 128        # over all hosts and devices
  train.steps_per_epoch = -1           # -1: one pass over the training split
  train.eval_every_epochs = 1          # validation pass (drives the plateau schedule)
  train.checkpoint_every_epochs = 10   # the last epoch is always checkpointed
  train.keep_checkpoints = 3           # complete checkpoints kept in the workdir
  train.log_every_steps = 50           # loss / throughput log line and TensorBoard scalars
  train.panel_every_epochs = 5         # PNG panel of a validation sample; 0 = never
  train.max_consecutive_nonfinite = 5  # stop after this many non-finite losses in a row

  # --- Device mesh (all devices of all hosts) -------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1   # size of the data axis; -1 = all devices / fsdp
  mesh.fsdp = 1    # >1 shards parameters and optimiser state over this axis (FSDP-style)
  return apply_variant(config, VARIANTS, variant)
