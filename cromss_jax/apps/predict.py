"""`python -m cromss_jax.predict --model MODEL --s2 S2 [--s1 S1] --out MAP.tif`: a land-cover map.

  [--window 256] [--overlap 64] [--batch 16]  sliding windows (see `cromss_jax.mapping`)
  [--confidence]                             a second band: round(max probability x 255)
  [--compute_dtype float32|bfloat16]         override the model's compute dtype
  [--s2_offset auto|0|1000]                  S2 DN offset (baseline >= 04.00 products: 1000)
  [--allow_no_crs]                           map a raster without georeferencing

MODEL: a transfer workdir or a pretraining export (EXPORT or EXPORT/pretrain_model). S2: a
raster with the 13 L1C bands, the 12 L2A bands, or the model's bands; or a folder of band files
(B01.tif ... / *_B8A.jp2) at native resolution; or a VRT. S1: VV, VH in dB, on any grid that
overlaps S2 (reprojected on the fly). MAP.tif is a Cloud-Optimised GeoTIFF; MAP.qml (QGIS style)
and MAP.tif.aux.xml (GDAL category names and attribute table) are written beside it. The
summary (pixels per class, windows computed and skipped) is printed as JSON.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags

from cromss_jax import cli

_MODEL = flags.DEFINE_string('model', None, 'Transfer workdir, or pretraining export '
                             '(EXPORT/pretrain_model or EXPORT).')
_S2 = flags.DEFINE_string('s2', None, 'Sentinel-2 raster (13 L1C bands, 12 L2A bands or the '
                          'model\'s bands), a folder of band files, or a VRT.')
_S1 = flags.DEFINE_string('s1', None, 'Sentinel-1 raster (VV, VH in dB); reprojected onto the '
                          'S2 grid when on another one.')
_OUT = flags.DEFINE_string('out', None, 'Output class map (Cloud-Optimised GeoTIFF).',
                           allow_override=True)
_WINDOW = flags.DEFINE_integer('window', 256, 'Window size in px (multiple of 32).')
_OVERLAP = flags.DEFINE_integer('overlap', 64, 'Overlap of neighbouring windows in px.')
_BATCH = flags.DEFINE_integer('batch', 16, 'Windows per forward pass.', allow_override=True)
_CONFIDENCE = flags.DEFINE_bool('confidence', False,
                                'Add a confidence band (max probability x 255).')
_COMPUTE_DTYPE = flags.DEFINE_string('compute_dtype', None, 'Override the model\'s compute dtype '
                                     '(float32 | bfloat16); e.g. float32 on CPUs.')
_S2_OFFSET = flags.DEFINE_string('s2_offset', 'auto', 'DN offset removed from S2 before '
                                 'normalising: auto (what the file declares: BOA/RADIO_ADD_OFFSET'
                                 ', a band offset, PROCESSING_BASELINE >= 04.00 -> 1000; else 0), '
                                 'or a number (0, 1000).')
_ALLOW_NO_CRS = flags.DEFINE_bool('allow_no_crs', False, 'Accept inputs without georeferencing '
                                  '(the map then has no CRS either).')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not _MODEL.value or not _OUT.value:
    raise cli.UserError('--model and --out are required')
  # Here, not at the top: `--help` and the mistakes above answer without importing JAX (~2 s).
  from cromss_jax import mapping  # pylint: disable=g-import-not-at-top
  # Everything that needs no model first: a bad argument costs no model loading.
  mapping.check_arguments(_WINDOW.value, _OVERLAP.value, _BATCH.value, _S2_OFFSET.value)
  for what, path in (('S2', _S2.value), ('S1', _S1.value)):
    if path and not os.path.exists(path):
      raise mapping.PredictionError(f'{what} input {path} does not exist.')
  mapping.check_output(_OUT.value, [_S2.value, _S1.value])
  predictor = mapping.load_predictor(_MODEL.value, with_s1=bool(_S1.value),
                                     compute_dtype=_COMPUTE_DTYPE.value)
  summary = mapping.predict_scene(
      predictor, _OUT.value, s2_path=_S2.value, s1_path=_S1.value, window=_WINDOW.value,
      overlap=_OVERLAP.value, batch=_BATCH.value, confidence=_CONFIDENCE.value,
      allow_no_crs=_ALLOW_NO_CRS.value, s2_offset=_S2_OFFSET.value)
  print(json.dumps(summary, indent=1))


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
