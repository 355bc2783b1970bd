"""Sensor bands, normalisation statistics and class tables of docs/METHOD.md §2, and the export
formats (one place for all; numpy only, so command lines read them without JAX)."""
from __future__ import annotations

import numpy as np

S1_BANDS = ('VV', 'VH')
S1_MEAN = (-12.54847273, -20.19237134)
S1_STD = (5.25697717, 5.91150917)

# Sentinel-2 L1C, the 13 bands in the order of docs/METHOD.md §2.1, with their native ground sampling distance (m).
S2_BANDS = ('B1', 'B2', 'B3', 'B4', 'B5', 'B6', 'B7', 'B8', 'B8A', 'B9', 'B10', 'B11', 'B12')
S2_RESOLUTION_M = (60, 10, 10, 10, 20, 20, 20, 10, 20, 60, 60, 20, 20)
S2_MEAN = (1605.57504906, 1390.78157673, 1314.8729939, 1363.52445545, 1549.44374991,
           2091.74883118, 2371.7172463, 2299.90463006, 2560.29504086, 830.06605044,
           22.10351321, 2177.07172323, 1524.06546312)
S2_STD = (786.78685367, 850.34818441, 875.06484736, 1138.84957046, 1122.17775652,
          1161.59187054, 1274.39184232, 1248.42891965, 1345.52684884, 577.31607053,
          51.15431158, 1336.09932639, 1136.53823676)

S2_L1C_BANDS = S2_BANDS
S2_L1C_MEAN, S2_L1C_STD = S2_MEAN, S2_STD

# Sentinel-2 L2A (surface reflectance, SSL4EO-S12 folder `s2a`): the L1C bands without B10 (the
# cirrus band is not in L2A products). Statistics: `S2A_MEAN` / `S2A_STD` of the SSL4EO-S12
# dataset code (zhu-xlab/SSL4EO-S12, src/benchmark/pretrain_ssl/datasets/SSL4EO/
# ssl4eo_dataset.py), computed by its authors on 50k locations, in the order of S2_L2A_BANDS.
S2_L2A_BANDS = tuple(b for b in S2_BANDS if b != 'B10')
S2_L2A_MEAN = (752.40087073, 884.29673756, 1144.16202635, 1297.47289228, 1624.90992062,
               2194.6423161, 2422.21248945, 2517.76053101, 2581.64687018, 2645.51888987,
               2368.51236873, 1805.06846033)
S2_L2A_STD = (1108.02887453, 1155.15170768, 1183.6292542, 1368.11351514, 1370.265037,
              1355.55390699, 1416.51487101, 1474.78900051, 1439.3086061, 1582.28010962,
              1455.52084939, 1343.48379601)

# Native ground sampling distance (m) of every S2 band, by name.
S2_BAND_RESOLUTION_M = dict(zip(S2_BANDS, S2_RESOLUTION_M))

# Product level -> (band names in record order, mean, std) used to normalise raw reflectance.
S2_PRODUCTS = {
    'L1C': (S2_L1C_BANDS, S2_L1C_MEAN, S2_L1C_STD),
    'L2A': (S2_L2A_BANDS, S2_L2A_MEAN, S2_L2A_STD),
}

# Products of processing baseline 04.00 and later (from 25 January 2022) store reflectance x 1e4
# plus this many digital numbers (the products' BOA/RADIO_ADD_OFFSET is -1000); it is removed
# before normalising so that old and new scenes share one scale.
S2_BASELINE_04_OFFSET_DN = 1000

# Indices into S2_BANDS for each supported band subset (docs/METHOD.md §2.1).
S2_BAND_SUBSETS = {
    13: tuple(range(13)),
    12: (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12),
    9: (1, 2, 3, 4, 5, 6, 7, 11, 12),
    3: (3, 2, 1),
}

TILE_SIZE = 264          # SSL4EO-S12 tiles on the 10 m grid
NUM_SEASONS = 4
MODALITIES = ('s1', 's2')  # Sentinel-1 radar, Sentinel-2 optical: the two branches

DW_CLASSES = ('Water', 'Trees', 'Grass', 'Flooded vegetation', 'Crops', 'Shrub & scrub',
              'Built area', 'Bare ground', 'Snow & ice')
# Dynamic World's published palette, used for maps and panels.
DW_PALETTE = ((65, 155, 223), (57, 125, 73), (136, 176, 83), (122, 135, 198), (228, 150, 53),
              (223, 195, 90), (196, 40, 27), (165, 155, 143), (179, 159, 225))

IGNORE_LABEL = 255
# DFC2020 class codes 1..10 -> DW-ordered 8 classes (docs/METHOD.md §2.4); 3 (savanna), 8 (snow) ignored.
DFC_TO_DW8 = {1: 1, 2: 5, 4: 2, 5: 3, 6: 4, 7: 6, 9: 7, 10: 0}
DFC_DW8_CLASSES = ('Water', 'Trees', 'Grass', 'Flooded vegetation', 'Crops', 'Shrub & scrub',
                   'Built area', 'Bare ground')


def dfc_lookup_table() -> np.ndarray:
  """uint8[256] mapping a DFC code to its DW-ordered class, IGNORE_LABEL elsewhere."""
  table = np.full(256, IGNORE_LABEL, np.uint8)
  for dfc, dw in DFC_TO_DW8.items():
    table[dfc] = dw
  return table


def normalise_to_uint8(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, int]:
  """docs/METHOD.md §2.2: clip((x - (m - 2s)) / 4s, 0, 1) * 255, rounded; bands on the last axis.

  Returns the uint8 array and the number of non-finite input values (stored as 0).
  """
  x = np.asarray(x, np.float64)
  mean = np.asarray(mean, np.float64)
  std = np.asarray(std, np.float64)
  finite = np.isfinite(x)
  value01 = np.clip((np.where(finite, x, 0.0) - (mean - 2 * std)) / (4 * std), 0.0, 1.0)
  out = np.rint(value01 * 255.0).astype(np.uint8)
  out[~finite] = 0
  return out, int(np.count_nonzero(~finite))

# Storage of exported variables (cromss_jax.exports): Orbax, or one safetensors file.
EXPORT_FORMATS = ('orbax', 'safetensors')
