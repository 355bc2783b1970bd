"""Transfer of one pretrained encoder to SSL4EO-S12@OSM (13 OpenStreetMap land-use classes).

Run:  python -m cromss_jax.main --config=configs/transfer_osm.py --workdir=DIR \
          --config.transfer.encoder_path=EXPORT/encoder_s2 \
          --config.data.dataset_dir=/path/to/converted/ssl4eo_s12_osm
(data: `python -m data_prep.ssl4eo_dwosm --labels osm`). The paper's OSM setting: FPN,
480 px random crops of the 512 px tiles, otherwise as configs/transfer_dw.py.
"""
import ml_collections

from configs import transfer_dwosm


def get_config() -> ml_collections.ConfigDict:
  return transfer_dwosm.dwosm_config('osm')
