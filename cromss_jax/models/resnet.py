"""ResNet-18/34/50 encoders (torchvision v1.5 layout) returning a 5-level feature pyramid.

The layout follows torchvision's ResNet as wrapped by segmentation_models_pytorch, which the
published CromSS code used, so parameter counts match the paper (docs/METHOD.md §3) and torchvision weights
could be ported by renaming alone. Layout is NHWC; the input may have any number of channels.

BatchNorm note: under `jax.jit` with the batch sharded over a device mesh, the batch statistics
that BatchNorm computes in training span the GLOBAL batch (XLA inserts the all-reduce). The
original PyTorch DDP code normalised per GPU (no SyncBatchNorm), so with many devices the
statistics here are computed over more samples than in the reference runs. A smaller
difference: flax updates the running variance with the biased batch variance, torch with the
unbiased one (a factor n/(n-1), n = pixels x batch, negligible at 256x256).
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
ENCODER_KERNEL_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# torch BatchNorm2d defaults: running = 0.9 * running + 0.1 * batch (torch momentum 0.1).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# depth -> (block kind, blocks per stage).
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def pyramid_channels(depth: int) -> tuple[int, int, int, int, int]:
  """Channels of the 5 pyramid levels (stem, layer1..layer4) of a ResNet of this depth."""
  if depth not in RESNET_LAYOUTS:
    raise ValueError(f'ResNet depth {depth!r} is not supported; expected one of '
                     f'{sorted(RESNET_LAYOUTS)}.')
  expansion = 4 if RESNET_LAYOUTS[depth][0] == 'bottleneck' else 1
  return (64,) + tuple(w * expansion for w in STAGE_WIDTHS)  # type: ignore[return-value]


def torch_padding(k: int, dilation: int = 1) -> tuple[tuple[int, int], tuple[int, int]]:
  """torch-style symmetric padding (k//2)*dilation (differs from 'SAME' for stride 2), so
  the published PyTorch weights give the same outputs here."""
  p = (k // 2) * dilation
  return ((p, p), (p, p))


def _conv_and_norm(dtype: Dtype, param_dtype: Dtype, train: bool):
  """The conv (no bias) and BatchNorm every residual block builds its layers from."""
  conv = functools.partial(nn.Conv, use_bias=False, kernel_init=ENCODER_KERNEL_INIT,
                           dtype=dtype, param_dtype=param_dtype)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                           epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype)
  return conv, norm


def _shortcut(x: jax.Array, out_features: int, strides: int, conv, norm) -> jax.Array:
  """Identity, or a 1x1 projection (conv + BN) when stride or width changes."""
  if strides == 1 and x.shape[-1] == out_features:
    return x
  y = conv(out_features, (1, 1), strides=strides, padding='VALID', name='downsample_conv')(x)
  return norm(name='downsample_bn')(y)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); projection shortcut when stride or width changes."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, self.param_dtype, train)
    y = conv(self.features, (3, 3), strides=self.strides, padding=torch_padding(3), name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, (3, 3), padding=torch_padding(3), name='conv2')(y)
    y = norm(name='bn2')(y)
    return nn.relu(y + _shortcut(x, self.features * self.expansion, self.strides, conv, norm))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (carries the stride, v1.5) -> 1x1 x4 (ResNet-50)."""
  features: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, self.param_dtype, train)
    out_features = self.features * self.expansion
    y = conv(self.features, (1, 1), padding='VALID', name='conv1')(x)
    y = nn.relu(norm(name='bn1')(y))
    y = conv(self.features, (3, 3), strides=self.strides, padding=torch_padding(3), name='conv2')(y)
    y = nn.relu(norm(name='bn2')(y))
    y = conv(out_features, (1, 1), padding='VALID', name='conv3')(y)
    y = norm(name='bn3')(y)
    return nn.relu(y + _shortcut(x, out_features, self.strides, conv, norm))


class ResNetStage(nn.Module):
  """`count` blocks of one width; the first carries the stride (torchvision's layerN)."""
  block_cls: type[nn.Module]
  features: int
  count: int
  strides: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i in range(self.count):
      block = self.block_cls(self.features, strides=self.strides if i == 0 else 1,  # type: ignore
                             dtype=self.dtype, param_dtype=self.param_dtype, name=f'block{i}')
      x = block(x, train=train)
    return x


class ResNetEncoder(nn.Module):
  """ResNet encoder returning [stem (/2, 64 ch), layer1 (/4), layer2 (/8), layer3 (/16),
  layer4 (/32)] for NHWC input with any channel count.

  Standalone so that a pretrained encoder can be lifted out of the pretraining model
  (`extract_encoder`) and wrapped by transfer decoders. Parameters are kept in `param_dtype`
  (float32); convolutions and BatchNorm outputs run in `dtype` (bfloat16 on accelerators).
  """
  depth: int = 50
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> list[jax.Array]:
    if self.depth not in RESNET_LAYOUTS:
      raise ValueError(f'ResNetEncoder depth={self.depth!r} is not supported; expected one of '
                       f'{sorted(RESNET_LAYOUTS)}.')
    if x.ndim != 4:
      raise ValueError(f'ResNetEncoder expects NHWC input, got shape {x.shape}.')
    kind, counts = RESNET_LAYOUTS[self.depth]
    block_cls = Bottleneck if kind == 'bottleneck' else BasicBlock
    x = x.astype(self.dtype)
    x = nn.Conv(64, (7, 7), strides=2, padding=torch_padding(7), use_bias=False,
                kernel_init=ENCODER_KERNEL_INIT, dtype=self.dtype, param_dtype=self.param_dtype,
                name='conv1')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     dtype=self.dtype, param_dtype=self.param_dtype, name='bn1')(x)
    x = nn.relu(x)
    features = [x]
    # Max-pool pads with -inf, as torch's MaxPool2d(3, 2, padding=1) does.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, (width, count) in enumerate(zip(STAGE_WIDTHS, counts)):
      x = ResNetStage(block_cls, width, count, strides=1 if stage == 0 else 2, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=f'layer{stage + 1}')(x, train=train)
      features.append(x)
    return features


def encoder_depth(name: str) -> int:
  """'resnet50' -> 50, with an error naming the allowed encoders."""
  allowed: Sequence[str] = [f'resnet{d}' for d in sorted(RESNET_LAYOUTS)]
  if name not in allowed:
    raise ValueError(f'model.encoder={name!r} is not supported; expected one of {allowed}.')
  return int(name[len('resnet'):])
