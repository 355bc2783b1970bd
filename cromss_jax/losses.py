"""Segmentation losses with an ignore label, shared by transfer, evaluation and the ablations.

The CromSS pretraining objective itself is `cromss_jax.objective`; these are its segmentation
terms applied with a valid-pixel mask instead of confidence weights.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from cromss_jax import objective


def valid_pixels(labels: jax.Array, num_classes: int, ignore_label: int) -> jax.Array:
  """Pixels whose label is a real class (not the ignore label, inside [0, C))."""
  return (labels != ignore_label) & (labels >= 0) & (labels < num_classes)


def masked_segmentation_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                             seg_losses: tuple[str, ...], ignore_label: int,
                             mask: jax.Array | None = None) -> jax.Array:
  """The configured CE / Dice / focal sum over valid pixels only (training and evaluation).

  Ignored pixels get weight 0 AND an all-zero target, so they add nothing to any term, and
  their logits get no gradient; the math is objective.segmentation_loss with the valid-pixel
  mask as the per-pixel weights.
  """
  valid = valid_pixels(labels, num_classes, ignore_label)
  if mask is not None:
    valid &= mask.astype(bool)
  weights = valid.astype(jnp.float32)
  targets = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes,
                           dtype=jnp.float32) * weights[..., None]
  return objective.segmentation_loss(logits.astype(jnp.float32), targets, weights,
                                     tuple(seg_losses))
