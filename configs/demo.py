"""Small CromSS pretraining for the embedded demo (`make demo`): minutes on 2 CPU cores.

The `demo` variant of configs/pretrain.py (`--config=configs/pretrain.py:demo` is the same):
ResNet-18, 128 px crops, 6 epochs, float32. `cromss_jax.demo` fills in data.dataset_dir after
generating and converting the demo data. `configs/demo.py:NAME` gives configs/pretrain.py's
variant NAME instead (e.g. `tiny`).
"""
from __future__ import annotations

import ml_collections

from configs import pretrain


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
  return pretrain.get_config(variant or 'demo')
