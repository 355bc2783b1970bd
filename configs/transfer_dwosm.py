"""Shared settings of configs/transfer_dw.py and configs/transfer_osm.py (not a config itself).

Both follow the CromSS fine-tuning scripts for the NoLDO-S12 downstream sets on top of
configs/transfer.py. Known differences from those scripts (the project's loop has no such
options yet): the cosine schedule decays to 0 over all 50 epochs (the reference decays to 1e-5
over 40 epochs, then holds it); evaluation runs on the centre crop of `data.crop_size` (the
reference scores whole tiles: the same for DW's 512 px crop, 480 of 512 px for OSM); DW trains
on whole 512 px tiles instead of 496 px random crops (crops must be multiples of 32 here); and
the flips are independent horizontal / vertical ones.
"""
import ml_collections

from configs import transfer

# labels -> (decoder, crop, classes). The reference crops 480 px for FPN and 496 px for
# DeepLabv3+; crops here must be multiples of 32, so DW uses the whole 512 px tile, which also
# makes its evaluation the reference's whole-tile one.
_SETTINGS = {
    'dw': ('deeplabv3plus', 512,
           ('Water', 'Trees', 'Grass', 'Flooded vegetation', 'Crops', 'Shrub & scrub',
            'Built area', 'Bare ground', 'Snow & ice')),
    'osm': ('fpn', 480,
            ('Urban', 'Arable land', 'Forest', 'Industrial', 'Artificial vegetation',
             'Dump site', 'Pasture', 'Permanent crops', 'Water', 'Open space', 'Shrub',
             'Wetland', 'Coastal')),
}


def dwosm_config(labels: str) -> ml_collections.ConfigDict:
  """The transfer config of SSL4EO-S12@DW (labels='dw') or @OSM (labels='osm')."""
  decoder, crop, classes = _SETTINGS[labels]
  config = transfer.get_config()
  config.transfer.decoder = decoder

  data = config.data
  data.dataset_dir = ''              # written by `python -m data_prep.ssl4eo_dwosm`
  data.train_split = 'train'
  data.test_split = 'test'
  data.tile_size = 512               # 510 px tiles are padded to 512 by the converter
  data.crop_size = crop
  data.rotation = 'free'             # the reference's Rotate(p=0.2): any angle in [-90, 90]
  data.rotation_prob = 0.2
  data.class_names = classes

  config.objective.num_classes = len(classes)
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 1e-8   # torch.optim.Adam(weight_decay=1e-8) in the reference
  config.schedule.name = 'cosine'
  config.training.num_epochs = 50
  config.training.global_batch_size = 32
  return config
