"""Transfer of one pretrained encoder to DFC2020 segmentation (SPEC §6 defaults).

Run:  python -m cromss_jax.main --config=configs/transfer.py --workdir=DIR \
          --config.transfer.encoder_path=EXPORT/encoder_s2 \
          --config.data.dataset_dir=/path/to/converted/dfc2020
Baseline without pretraining: --config.transfer.encoder_path=random.
"""
import ml_collections

from configs import pretrain


def get_config() -> ml_collections.ConfigDict:
  config = pretrain.get_config()
  config.transfer = transfer = ml_collections.ConfigDict()
  transfer.encoder_path = 'random'   # an exported encoder dir (EXPORT/encoder_s2) or 'random'
  transfer.modality = 's2'           # s1 | s2: which sensor feeds the encoder
  transfer.decoder = 'pspnet'        # pspnet | deeplabv3plus | fpn | unet
  transfer.freeze_encoder = True     # True: frozen (linear-probe style); False: fine-tuned
  transfer.ignore_label = 255

  data = config.data
  data.dataset_dir = ''              # written by `python -m data_prep.dfc2020`
  data.train_split = 'validation'    # the smaller DFC2020 split trains, as in the literature
  data.test_split = 'test'
  data.tile_size = 256
  data.crop_size = 256
  data.rotation = 'rot90'

  config.model.encoder = 'resnet50'
  config.objective.num_classes = 8   # DW-ordered DFC2020 classes (SPEC §2.4)
  config.objective.seg_losses = ('ce', 'dice')

  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 0.0
  config.schedule.name = 'cosine'

  training = config.training
  training.num_epochs = 50
  training.global_batch_size = 32
  training.checkpoint_every_epochs = 10
  training.panel_every_epochs = 0
  return config
