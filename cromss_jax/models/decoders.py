"""Transfer decoders (docs/METHOD.md §6) on a ResNet feature pyramid, and the transfer network.

The published transfer experiments used segmentation_models_pytorch (smp) with its default
settings; each decoder here keeps those defaults so that results stay comparable:

* PSPNet: encoder depth 3 (only the stride-8 feature, layer2), pyramid pooling with bins
  (1, 2, 3, 6) to in/4 channels each (the 1x1 bin has no BatchNorm, as in smp), 1x1 conv to 512 +
  BN + ReLU, channel dropout 0.2, 3x3 head, bilinear x8 (align_corners=True).
* DeepLabV3+: output stride 16 (layer4 without stride, 3x3 convs dilated by 2), ASPP with rates
  (12, 24, 36) and depthwise-separable convs to 256 channels, image pooling, 1x1 projection +
  dropout 0.5, separable 3x3; x4 up, concatenated with the stride-4 feature projected to 48
  channels, separable 3x3; 1x1 head, bilinear x4.
* FPN: pyramid 256 channels (nearest x2 top-down + 1x1 lateral), per-level 3x3 conv + GroupNorm
  (32) + ReLU (+ bilinear x2) blocks down to stride 4 with 128 channels, merged by addition,
  channel dropout 0.2, 1x1 head, bilinear x4.
* U-Net: the pretraining decoder (`UNetDecoder`), channels (256, 128, 64, 32, 16).

`TransferModel` keeps the encoder under the variable key 'encoder' with exactly the structure
of the pretraining encoders, so an exported encoder (`cromss_jax.export`) loads 1:1.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cromss_jax.models.fusion import compute_dtype
from cromss_jax.models.resnet import (BN_EPSILON, BN_MOMENTUM, ResNetEncoder, encoder_depth,
                                      torch_padding)
from cromss_jax.models.unet import DECODER_KERNEL_INIT, HEAD_KERNEL_INIT, UNetDecoder

Dtype = Any

DECODERS = ('pspnet', 'deeplabv3plus', 'fpn', 'unet')
# Encoder stages a decoder never reads: smp builds PSPNet's encoder with depth 3, so these do
# not exist there. Here they stay in the variables (exports load 1:1) but are neither trained
# nor have their BatchNorm statistics updated (see `unused_encoder_stages`).
_UNUSED_STAGES = {'pspnet': ('layer3', 'layer4')}
GROUPNORM_GROUPS = 32      # smp FPN: nn.GroupNorm(32, channels)
GROUPNORM_EPSILON = 1e-5   # torch default


def unused_encoder_stages(decoder: str) -> tuple[str, ...]:
  """Top-level encoder modules whose outputs `decoder` ignores (frozen and stats kept)."""
  return _UNUSED_STAGES.get(decoder, ())


# ----------------------------------------------------------------------------------------------
# Resampling as small matrices (exact torch semantics, any size, cheap on every backend).
# ----------------------------------------------------------------------------------------------
def _bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of 1-D linear interpolation with align_corners=True (torch)."""
  m = np.zeros((out_size, in_size), np.float32)
  if in_size == 1 or out_size == 1:
    m[:, 0] = 1.0
    return m
  src = np.arange(out_size) * (in_size - 1) / (out_size - 1)
  lo = np.minimum(np.floor(src).astype(int), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo).astype(np.float32)
  np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(m, (np.arange(out_size), hi), frac)
  return m


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] averaging weights of torch's AdaptiveAvgPool (bins may overlap)."""
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _separable_apply(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  x = jnp.einsum('oh,bhwc->bowc', jnp.asarray(rows, x.dtype), x)
  return jnp.einsum('pw,bowc->bopc', jnp.asarray(cols, x.dtype), x)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """NHWC bilinear resize with align_corners=True (smp's UpsamplingBilinear2d)."""
  h, w = x.shape[1:3]
  if (h, w) == tuple(size):
    return x
  return _separable_apply(x, _bilinear_matrix(h, size[0]), _bilinear_matrix(w, size[1]))


def adaptive_avg_pool(x: jax.Array, bins: int) -> jax.Array:
  h, w = x.shape[1:3]
  return _separable_apply(x, _adaptive_pool_matrix(h, bins), _adaptive_pool_matrix(w, bins))


def _upsample_nearest2x(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class _Layers:
  """Conv / norm factories with the smp initialisation and torch BatchNorm settings."""

  def __init__(self, dtype: Dtype, param_dtype: Dtype, train: bool):
    self.conv = functools.partial(nn.Conv, kernel_init=DECODER_KERNEL_INIT,
                                  bias_init=nn.initializers.zeros, dtype=dtype,
                                  param_dtype=param_dtype)
    self.bn = functools.partial(nn.BatchNorm, use_running_average=not train,
                                momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype,
                                param_dtype=param_dtype)
    self.head = functools.partial(nn.Conv, kernel_init=HEAD_KERNEL_INIT,
                                  bias_init=nn.initializers.zeros, dtype=dtype,
                                  param_dtype=param_dtype)


class SeparableConv(nn.Module):
  """Depthwise kxk (optionally dilated) then pointwise 1x1, no bias (smp SeparableConv2d)."""
  features: int
  kernel: int = 3
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train=False)
    x = layers.conv(x.shape[-1], (self.kernel, self.kernel), padding=torch_padding(self.kernel,
                                                                          self.dilation),
                    kernel_dilation=self.dilation, feature_group_count=x.shape[-1],
                    use_bias=False, name='depthwise')(x)
    return layers.conv(self.features, (1, 1), use_bias=False, name='pointwise')(x)


class PSPNetDecoder(nn.Module):
  """Pyramid pooling on the stride-8 feature (smp PSPNet defaults)."""
  num_classes: int
  out_channels: int = 512
  bins: Sequence[int] = (1, 2, 3, 6)
  dropout: float = 0.2
  upsampling: int = 8
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    x = features[2].astype(self.dtype)          # layer2, stride 8 (smp encoder_depth=3)
    h, w = x.shape[1:3]
    branch_channels = x.shape[-1] // len(self.bins)
    branches = []
    for b in self.bins:
      y = adaptive_avg_pool(x, b)
      with_bn = b != 1                           # smp: no BatchNorm on the 1x1 bin
      y = layers.conv(branch_channels, (1, 1), use_bias=not with_bn, name=f'pool{b}_conv')(y)
      if with_bn:
        y = layers.bn(name=f'pool{b}_bn')(y)
      branches.append(resize_bilinear(nn.relu(y), (h, w)))
    y = jnp.concatenate(branches + [x], axis=-1)
    y = layers.conv(self.out_channels, (1, 1), use_bias=False, name='bottleneck_conv')(y)
    y = nn.relu(layers.bn(name='bottleneck_bn')(y))
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(y)
    return layers.head(self.num_classes, (3, 3), padding=torch_padding(3), name='head')(y)


class DeepLabV3PlusDecoder(nn.Module):
  """ASPP on the stride-16 feature plus a stride-4 refinement (smp DeepLabV3Plus defaults).

  Expects the encoder to have run with its last stage dilated (output stride 16); see
  `TransferModel`. At init the stage is not dilated (shapes only), hence resizing to the
  low-level feature's size instead of a fixed x4.
  """
  num_classes: int
  channels: int = 256
  rates: Sequence[int] = (12, 24, 36)
  low_level_channels: int = 48
  dropout: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    sep = functools.partial(SeparableConv, dtype=self.dtype, param_dtype=self.param_dtype)
    x = features[4].astype(self.dtype)
    h, w = x.shape[1:3]
    branches = [nn.relu(layers.bn(name='aspp0_bn')(
        layers.conv(self.channels, (1, 1), use_bias=False, name='aspp0_conv')(x)))]
    for i, rate in enumerate(self.rates, start=1):
      y = sep(self.channels, 3, rate, name=f'aspp{i}_sepconv')(x)
      branches.append(nn.relu(layers.bn(name=f'aspp{i}_bn')(y)))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = layers.conv(self.channels, (1, 1), use_bias=False, name='aspp_pool_conv')(pooled)
    pooled = nn.relu(layers.bn(name='aspp_pool_bn')(pooled))
    branches.append(jnp.broadcast_to(pooled, (x.shape[0], h, w, self.channels)))
    y = jnp.concatenate(branches, axis=-1)
    y = layers.conv(self.channels, (1, 1), use_bias=False, name='aspp_project_conv')(y)
    y = nn.relu(layers.bn(name='aspp_project_bn')(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.relu(layers.bn(name='aspp_sep_bn')(sep(self.channels, 3, name='aspp_sepconv')(y)))

    low = features[1].astype(self.dtype)         # layer1, stride 4
    low = layers.conv(self.low_level_channels, (1, 1), use_bias=False, name='low_conv')(low)
    low = nn.relu(layers.bn(name='low_bn')(low))
    y = resize_bilinear(y, low.shape[1:3])
    y = jnp.concatenate([y, low], axis=-1)
    y = nn.relu(layers.bn(name='fuse_bn')(sep(self.channels, 3, name='fuse_sepconv')(y)))
    return layers.head(self.num_classes, (1, 1), name='head')(y)


class FPNDecoder(nn.Module):
  """Feature pyramid network with a semantic-segmentation branch (smp FPN defaults)."""
  num_classes: int
  pyramid_channels: int = 256
  segmentation_channels: int = 128
  dropout: float = 0.2
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], *, train: bool) -> jax.Array:
    layers = _Layers(self.dtype, self.param_dtype, train)
    c2, c3, c4, c5 = (f.astype(self.dtype) for f in features[1:5])
    p = layers.conv(self.pyramid_channels, (1, 1), name='p5')(c5)
    pyramid = [p]
    for name, skip in (('p4', c4), ('p3', c3), ('p2', c2)):
      p = _upsample_nearest2x(p) + layers.conv(self.pyramid_channels, (1, 1),
                                               name=f'{name}_lateral')(skip)
      pyramid.append(p)
    merged = None
    for level, (p, n_up) in enumerate(zip(pyramid, (3, 2, 1, 0))):
      y = p
      for j in range(max(n_up, 1)):
        y = layers.conv(self.segmentation_channels, (3, 3), padding=torch_padding(3), use_bias=False,
                        name=f'seg{level}_conv{j}')(y)
        y = nn.GroupNorm(num_groups=GROUPNORM_GROUPS, epsilon=GROUPNORM_EPSILON,
                         dtype=self.dtype, param_dtype=self.param_dtype,
                         name=f'seg{level}_gn{j}')(y)
        y = nn.relu(y)
        if n_up:
          y = resize_bilinear(y, (2 * y.shape[1], 2 * y.shape[2]))
      merged = y if merged is None else merged + y
    y = nn.Dropout(self.dropout, broadcast_dims=(1, 2), deterministic=not train)(merged)
    return layers.head(self.num_classes, (1, 1), name='head')(y)


_DECODER_CLASSES: Mapping[str, type[nn.Module]] = {
    'pspnet': PSPNetDecoder, 'deeplabv3plus': DeepLabV3PlusDecoder, 'fpn': FPNDecoder,
    'unet': UNetDecoder}   # same variables as the pretraining decoder (+ head)


# ----------------------------------------------------------------------------------------------
# Output stride 16 for DeepLabV3+ without a second encoder implementation
# ----------------------------------------------------------------------------------------------
def _dilate_stage(stage: str, rate: int) -> Callable:
  """Flax method interceptor: convs of `stage` run with stride 1 and dilation `rate`.

  This is smp's `make_dilated` (torchvision's replace_stride_with_dilation with the same
  padding): every conv of the stage loses its stride, and kxk kernels (k > 1) are dilated with
  padding (k // 2) * rate. The variables are the encoder's own, untouched, so exports load
  1:1. At init the convs run unchanged (only shapes matter there).
  """

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (context.method_name != '__call__' or not isinstance(module, nn.Conv)
        or stage not in module.path or module.is_initializing()):
      return next_fun(*args, **kwargs)
    kh, kw = module.kernel_size
    dilated = module.clone(
        parent=None, name=None, strides=1,
        kernel_dilation=(rate if kh > 1 else 1, rate if kw > 1 else 1),
        padding=((kh // 2 * rate,) * 2, (kw // 2 * rate,) * 2))
    return dilated.apply({'params': module.variables['params']}, *args, **kwargs)

  return interceptor


class TransferModel(nn.Module):
  """One ResNet encoder + one transfer decoder -> float32 logits at the input resolution.

  Variables: top-level keys 'encoder' (a `ResNetEncoder`, structured as in the pretraining
  networks) and 'decoder'. A frozen encoder always runs in inference mode (running BatchNorm
  statistics, which therefore never change) and its features are cut from the gradient.
  Dropout (PSPNet, DeepLabV3+, FPN) needs a 'dropout' rng when `train` is True.
  """
  encoder_depth: int
  decoder: str
  num_classes: int
  dtype: Dtype = jnp.float32
  freeze_encoder: bool = False
  decoder_channels: Sequence[int] = (256, 128, 64, 32, 16)   # U-Net only
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if self.decoder not in _DECODER_CLASSES:
      raise ValueError(f'transfer decoder {self.decoder!r} is not supported; expected one of '
                       f'{list(DECODERS)}.')
    if x.ndim != 4 or x.shape[1] % 32 or x.shape[2] % 32:
      raise ValueError(f'TransferModel expects NHWC input with height and width multiples of '
                       f'32, got shape {x.shape}.')
    encoder = ResNetEncoder(depth=self.encoder_depth, dtype=self.dtype,
                            param_dtype=self.param_dtype, name='encoder')
    encoder_train = train and not self.freeze_encoder
    if self.decoder == 'deeplabv3plus':
      with nn.intercept_methods(_dilate_stage('layer4', 2)):
        features = encoder(x, train=encoder_train)
    else:
      features = encoder(x, train=encoder_train)
    if self.freeze_encoder:
      features = [jax.lax.stop_gradient(f) for f in features]
    kwargs = {'decoder_channels': tuple(self.decoder_channels)} if self.decoder == 'unet' else {}
    logits = _DECODER_CLASSES[self.decoder](
        num_classes=self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
        name='decoder', **kwargs)(features, train=train)
    return resize_bilinear(logits.astype(jnp.float32), x.shape[1:3])


def build_transfer_model(config) -> TransferModel:
  """The transfer network described by a `configs/transfer.py` config."""
  return TransferModel(
      encoder_depth=encoder_depth(config.model.encoder),
      decoder=str(config.transfer.decoder),
      num_classes=int(config.objective.num_classes),
      dtype=compute_dtype(config.model.compute_dtype),
      freeze_encoder=bool(config.transfer.freeze_encoder),
      decoder_channels=tuple(int(c) for c in config.model.decoder_channels))


def input_channels(config) -> int:
  """Channels of the transfer encoder's input: 2 (S1) or the S2 band subset size."""
  if config.transfer.modality == 's1':
    return int(config.model.s1_channels)
  return int(config.data.s2_bands)
