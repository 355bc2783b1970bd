"""Transfer of one pretrained encoder to DFC2020 segmentation (docs/METHOD.md §6 defaults).

Run:  python -m cromss_jax.main --config=configs/transfer.py --workdir=DIR \
          --config.transfer.encoder_path=EXPORT/encoder_s2 \
          --config.data.dataset_dir=/path/to/converted/dfc2020
Baseline without pretraining: --config.transfer.encoder_path=random.

Every key of configs/pretrain.py is here too (same meaning), plus `transfer.*`,
`data.train_split`, `data.test_split` and `data.class_names`. Variants
(`--config=configs/transfer.py:NAME`):
  (none)  the literature's DFC2020 setting: ResNet-50 + PSPNet, batch 32, 50 epochs.
  demo    `make demo`: ResNet-18, float32, batch 8, 4 epochs.
  study   the noise-robustness study's default scale: ResNet-18, 128 px crops, 10 epochs,
          evaluated on the test split at the end only.
  tiny    the smallest real run (tests, smoke checks): ResNet-18, batch 2, 1 epoch x 2 steps.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from configs import pretrain
from cromss_jax import constants

VARIANTS: dict[str, dict[str, Any]] = {
    'demo': {
        'model.encoder': 'resnet18',
        'model.compute_dtype': 'float32',
        'training.num_epochs': 4,
        'training.global_batch_size': 8,
        'training.log_every_steps': 3,
    },
    'study': {
        'data.crop_size': 128,
        'model.encoder': 'resnet18',
        'model.compute_dtype': 'float32',
        'training.num_epochs': 10,
        'training.global_batch_size': 8,
        'training.eval_every_epochs': 10,
        'training.checkpoint_every_epochs': 10,
        'training.keep_checkpoints': 1,
        'training.log_every_steps': 10,
    },
    'tiny': {
        'data.shuffle_buffer': 8,
        'model.encoder': 'resnet18',
        'model.compute_dtype': 'float32',
        'training.global_batch_size': 2,
        'training.num_epochs': 1,
        'training.steps_per_epoch': 2,
        'training.checkpoint_every_epochs': 1,
        'training.log_every_steps': 1,
    },
}


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  """The DFC2020 transfer config, or one of VARIANTS (`configs/transfer.py:tiny`)."""
  config = pretrain.get_config()
  config.transfer = transfer = ml_collections.ConfigDict()
  transfer.encoder_path = 'random'   # an exported encoder dir (EXPORT/encoder_s2) or 'random'
  transfer.modality = 's2'           # s1 | s2: which sensor feeds the encoder
  transfer.decoder = 'pspnet'        # pspnet | deeplabv3plus | fpn | unet
  transfer.freeze_encoder = True     # True: frozen (linear-probe style); False: fine-tuned
  transfer.ignore_label = 255        # label value of unlabelled pixels in the records

  data = config.data
  data.dataset_dir = ''              # written by `python -m data_prep.dfc2020`
  data.train_split = 'validation'    # the smaller DFC2020 split trains, as in the literature
  data.test_split = 'test'           # scored at the end (and every eval_every_epochs)
  data.class_names = constants.DFC_DW8_CLASSES   # report names, one per class
  data.tile_size = 256               # DFC2020 patches
  data.crop_size = 256               # whole patches
  # Random non-zero quarter turns with p = 0.2 (plus the flips). p = 0.75 would make all 8
  # orientations equally likely; 0.2 is the pretraining probability, kept as the run default.
  data.rotation = 'rot90'
  data.rotation_prob = 0.2
  # The downstream sets are read with tf.data (small sets of patches, augmented on the host).
  del data['num_workers']
  data.shuffle_buffer = 1024         # examples (patches) per host
  data.num_parallel_calls = -1       # parallel element calls; -1 = tf.data.AUTOTUNE
  data.cache = False                 # cache decoded records in host memory (small sets only)

  config.model.encoder = 'resnet50'  # must be the pretrained encoder's
  config.objective.num_classes = 8   # DW-ordered DFC2020 classes (docs/METHOD.md §2.4)
  config.objective.seg_losses = ('ce', 'dice')   # over labelled pixels (docs/METHOD.md §6)

  # docs/METHOD.md §6: Adam 5e-4 without weight decay, cosine schedule.
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 0.0
  config.schedule.name = 'cosine'

  # docs/METHOD.md §6: 50 epochs of batch 32; no pretraining panel.
  training = config.training
  training.num_epochs = 50
  training.global_batch_size = 32
  training.checkpoint_every_epochs = 10
  training.panel_every_epochs = 0
  return pretrain.apply_variant(config, VARIANTS, variant)
