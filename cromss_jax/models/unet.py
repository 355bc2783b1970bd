"""U-Net decoder and segmentation head, laid out as segmentation_models_pytorch's `Unet`.

The published CromSS code used smp's Unet, so the block structure (nearest x2 upsampling, skip
concatenation, two 3x3 conv + BN + ReLU, identity centre, 3x3 head with bias) is kept exactly:
this is what makes the parameter counts of docs/METHOD.md §3 come out.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cromss_jax.models.resnet import BN_EPSILON, BN_MOMENTUM

Dtype = Any

# smp's initialize_decoder: kaiming_uniform_(mode='fan_in', nonlinearity='relu') for convs;
# initialize_head: xavier_uniform_ with zero bias.
DECODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_in', 'uniform')
HEAD_KERNEL_INIT = nn.initializers.xavier_uniform()


def _upsample2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour x2 upsampling (NHWC), torch's F.interpolate(scale_factor=2)."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class DecoderBlock(nn.Module):
  """Upsample x2, concatenate the skip (if any), then two 3x3 conv (no bias) + BN + ReLU."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array | None, *, train: bool) -> jax.Array:
    x = _upsample2x(x)
    if skip is not None:
      if skip.shape[1:3] != x.shape[1:3]:
        raise ValueError(
            f'U-Net skip of spatial size {skip.shape[1:3]} does not match the upsampled '
            f'decoder feature {x.shape[1:3]}; input height and width must be multiples of 32.')
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
    for i in (1, 2):
      x = nn.Conv(self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                  kernel_init=DECODER_KERNEL_INIT, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f'conv{i}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                       dtype=self.dtype, param_dtype=self.param_dtype, name=f'bn{i}')(x)
      x = nn.relu(x)
    return x


class UNetDecoder(nn.Module):
  """U-Net decoder plus its 3x3 segmentation head: 5-level pyramid -> float32 logits.

  `features` are [stem, layer1, layer2, layer3, layer4] as returned by `ResNetEncoder`. The
  deepest level enters the first block (centre = identity); the skips, deep to shallow, are
  layer3, layer2, layer1, stem; the last block has none. The head lives inside this module so
  a fusion model's variables have only encoder and decoder keys at the top.
  """
  num_classes: int
  decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(features) != len(self.decoder_channels):
      raise ValueError(f'UNetDecoder got {len(features)} feature levels but has '
                       f'{len(self.decoder_channels)} decoder channels; they must match.')
    x = features[-1]
    skips = list(reversed(features[:-1])) + [None]
    for i, (channels, skip) in enumerate(zip(self.decoder_channels, skips)):
      x = DecoderBlock(channels, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f'block{i}')(x, skip, train=train)
    logits = nn.Conv(self.num_classes, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                     kernel_init=HEAD_KERNEL_INIT, bias_init=nn.initializers.zeros,
                     dtype=self.dtype, param_dtype=self.param_dtype, name='head')(x)
    return logits.astype(jnp.float32)
