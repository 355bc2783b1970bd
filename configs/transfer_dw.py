"""Transfer of one pretrained encoder to SSL4EO-S12@DW (9 Dynamic World expert classes).

Run:  python -m cromss_jax.main --config=configs/transfer_dw.py --workdir=DIR \
          --config.transfer.encoder_path=EXPORT/encoder_s2 \
          --config.data.dataset_dir=/path/to/converted/ssl4eo_s12_dw
(data: `python -m data_prep.ssl4eo_dwosm --labels dw`). The paper's DW setting: DeepLabv3+,
flips and free rotation (p = 0.2), Adam lr 5e-4 (weight decay 1e-8), cosine schedule, batch 32,
50 epochs, CE + Dice over labelled pixels; whole 512 px tiles (the paper: 496 px random crops,
not a multiple of 32; see configs/transfer_dwosm.py for the differences).
"""
import ml_collections

from configs import transfer_dwosm


def get_config() -> ml_collections.ConfigDict:
  return transfer_dwosm.dwosm_config('dw')
