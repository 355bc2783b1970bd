"""The CromSS objective (docs/METHOD.md §4): pure JAX math on arrays, jit-able, epoch may be traced.

Per pixel, each modality's prediction confidence decides how much the other branch imitates it
(consistency weights), and its confidence in the noisy label decides how much that label is
trusted (class-balanced label-selection weights). Labels are softened with a spatial-temporal
prior computed on the accelerator from the season stack. All weights are computed under
stop-gradient.

Shapes: logits [B, H, W, C] (any float dtype, computed in float32), labels [B, H, W] int,
prior [B, H, W, C] float or None. `cfg` is `configs/pretrain.py:get_config().objective`.

Where this implementation deliberately differs from the published PyTorch code, the
difference is noted here (see also README, "Differences from the original PyTorch code"):
  * entropy confidence uses 0 log 0 = 0 (the reference turns the NaN it gets into a confidence
    of 0 for that pixel);
  * a weight sum of 0 gives a segmentation CE term of 0 (the reference divides by zero);
  * focal loss is the sigmoid focal loss (gamma 2, no alpha) summed over classes, taken against
    the soft targets T (identical to the reference for hard labels; the reference's one is
    undefined for soft targets).
A keep ratio of exactly 0 (only reachable with keep_ratio=0) follows the reference: the label
weights are then the entangled label confidences themselves.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import ml_collections

from cromss_jax.config_validation import validate_objective_config

# The prior's Gaussian (docs/METHOD.md §4.12); configs/pretrain.py sets the same values as
# objective.prior_sigma / prior_truncate, which an objective section may leave out.
PRIOR_SIGMA = 3.0
PRIOR_TRUNCATE = 4.0

Array = jax.Array
_DICE_EPS = 1e-7


# --------------------------------------------------------------------------------------------
# Confidences (docs/METHOD.md §4.1-4.2)
# --------------------------------------------------------------------------------------------
def prediction_confidence(probs: Array, kind: str) -> Array:
  """Per-pixel confidence in [0, 1] from class probabilities [..., C]."""
  num_classes = probs.shape[-1]
  if kind == 'entropy':
    entropy = jnp.sum(jax.scipy.special.entr(probs), axis=-1)  # entr(0) = 0
    conf = 1.0 - entropy / math.log(num_classes)
  elif kind == 'gini':
    conf = jnp.sum(probs * probs, axis=-1)
  else:
    raise ValueError(f"confidence must be 'entropy' or 'gini', got {kind!r}")
  return jnp.clip(conf, 0.0, 1.0)


def label_confidence(probs: Array, labels: Array) -> Array:
  """p_y: the probability the branch gives to the (noisy) label."""
  return jnp.take_along_axis(probs, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entangle(conf_s1: Array, conf_s2: Array) -> tuple[Array, Array]:
  """Cross-modal entangling: each branch's confidence is averaged with the joint one."""
  joint = conf_s1 * conf_s2
  return (conf_s1 + joint) / 2, (conf_s2 + joint) / 2


# --------------------------------------------------------------------------------------------
# Schedules (docs/METHOD.md §4.3-4.5)
# --------------------------------------------------------------------------------------------
def ramp(epoch: Array | float, kind: str, length: int) -> Array:
  """r(e) in [0, 1]; `epoch` may be a traced scalar."""
  e = jnp.asarray(epoch, jnp.float32)
  if kind == 'none' or length == 0:
    return jnp.ones((), jnp.float32)
  if kind == 'exp':
    phase = 1.0 - jnp.clip(e, 0.0, float(length)) / length
    return jnp.exp(-5.0 * phase * phase)
  if kind == 'linear':
    return jnp.minimum(jnp.maximum(e, 0.0) / length, 1.0)
  raise ValueError(f"ramp must be 'exp', 'linear' or 'none', got {kind!r}")


def keep_ratio(epoch: Array | float, cfg: ml_collections.ConfigDict) -> Array:
  """k(e) = 1 - r(e) (1 - q) during the ramp, q after it.

  Written as q + (1 - r)(1 - q): the same value, but exactly q in float32 once r = 1, as the
  reference's float64 arithmetic gives (1 - (1 - 0.3) is 0.29999998 in float32, which would
  change floor(n_c k) at the end of the ramp).
  """
  r = ramp(epoch, cfg.ramp, cfg.ramp_epochs)
  q = jnp.float32(cfg.keep_ratio)
  in_ramp = jnp.asarray(epoch, jnp.float32) <= cfg.ramp_epochs
  return jnp.where(in_ramp, q + (1.0 - r) * (1.0 - q), q)


def consistency_weights(conf: Array, epoch: Array | float,
                        cfg: ml_collections.ConfigDict) -> Array:
  """w_e = (1 - r) + r c' during the ramp, c' after it."""
  r = ramp(epoch, cfg.ramp, cfg.ramp_epochs)
  in_ramp = jnp.asarray(epoch, jnp.float32) <= cfg.ramp_epochs
  return jnp.where(in_ramp, (1.0 - r) + r * conf, conf)


def label_selection_weights(conf: Array, labels: Array, keep: Array,
                            num_classes: int) -> Array:
  """Class-balanced soft selection of trusted labels (docs/METHOD.md §4.4).

  For each class c in the batch, m = floor(n_c k) and t = the m-th largest confidence among its
  pixels; a pixel's weight is min(l'/t, 1) (1 if t = 0), and 0 for classes with m = 0.
  All class thresholds come from ONE lexicographic sort by (class, -confidence) over the batch.
  """
  flat_conf = conf.reshape(-1).astype(jnp.float32)
  flat_labels = labels.reshape(-1).astype(jnp.int32)
  n = flat_conf.shape[0]
  valid = (flat_labels >= 0) & (flat_labels < num_classes)
  sort_key = jnp.where(valid, flat_labels, num_classes)   # invalid labels sort last
  _, sorted_neg_conf = lax.sort((sort_key, -flat_conf), num_keys=2)
  counts = jnp.bincount(sort_key, length=num_classes + 1)[:num_classes].astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  # Same arithmetic as the reference: int(n_c * k) in float32.
  keep_counts = jnp.floor(counts.astype(jnp.float32) * keep).astype(jnp.int32)
  index = jnp.clip(starts + keep_counts - 1, 0, n - 1)
  thresholds = -sorted_neg_conf[index]                                  # [C]
  class_idx = jnp.clip(flat_labels, 0, num_classes - 1)
  t = thresholds[class_idx]
  m = keep_counts[class_idx]
  safe_t = jnp.where(t > 0, t, 1.0)
  soft = jnp.where(t > 0, jnp.minimum(flat_conf / safe_t, 1.0), 1.0)
  weights = jnp.where((m > 0) & valid, soft, 0.0)
  weights = jnp.where(keep >= 1.0, jnp.where(valid, 1.0, 0.0), weights)
  weights = jnp.where(keep <= 0.0, jnp.where(valid, flat_conf, 0.0), weights)
  return weights.reshape(conf.shape)


# --------------------------------------------------------------------------------------------
# Targets and losses (docs/METHOD.md §4.6-4.9)
# --------------------------------------------------------------------------------------------
def smoothed_targets(labels: Array, prior: Array | None,
                     cfg: ml_collections.ConfigDict) -> Array:
  """T = onehot(y)(1 - a - b) + a P + b/C; (a,) alone: onehot(1 - a) + a P.

  Without a prior (but smoothing on) this is ordinary label smoothing with a: onehot(1-a) + a/C.
  """
  num_classes = cfg.num_classes
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if not cfg.label_smoothing:
    return onehot
  factors = tuple(float(f) for f in cfg.smoothing_factors)
  a = factors[0]
  if prior is None:
    return onehot * (1.0 - a) + a / num_classes
  prior = prior.astype(jnp.float32)
  if len(factors) == 1:
    return onehot * (1.0 - a) + a * prior
  b = factors[1]
  return onehot * (1.0 - a - b) + a * prior + b / num_classes


def _weighted_mean(values: Array, weights: Array) -> Array:
  """sum(w v) / sum(w), and 0 where the weights sum to 0 (with a finite gradient)."""
  total = jnp.sum(weights)
  return jnp.sum(weights * values) / jnp.where(total > 0, total, 1.0)


def soft_cross_entropy(logits: Array, targets: Array) -> Array:
  """Per-pixel CE(z, T) = -sum_c T_c log softmax(z)_c."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def weighted_dice_loss(probs: Array, targets: Array, weights: Array) -> Array:
  """mean_c (1 - 2 I_c / max(K_c, eps)), sums over the whole batch; empty classes add 0."""
  w = weights[..., None]
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(w * probs * targets, axis=axes)
  cardinality = jnp.sum(w * (probs + targets), axis=axes)
  score = 2.0 * intersection / jnp.maximum(cardinality, _DICE_EPS)
  present = jnp.sum(targets, axis=axes) > 0
  return jnp.mean(jnp.where(present, 1.0 - score, 0.0))


def focal_loss(logits: Array, targets: Array, gamma: float = 2.0) -> Array:
  """Per-pixel sigmoid focal loss summed over classes (segmentation_models_pytorch style)."""
  bce = (jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  pt = jnp.exp(-bce)
  return jnp.sum((1.0 - pt) ** gamma * bce, axis=-1)


def segmentation_loss(logits: Array, targets: Array, weights: Array,
                      losses: tuple[str, ...]) -> Array:
  """Seg_d: the configured sum of weighted CE, Dice and focal terms for one branch."""
  total = jnp.zeros((), jnp.float32)
  for name in losses:
    if name == 'ce':
      total += _weighted_mean(soft_cross_entropy(logits, targets), weights)
    elif name == 'dice':
      total += weighted_dice_loss(jax.nn.softmax(logits, axis=-1), targets, weights)
    elif name == 'focal':
      total += _weighted_mean(focal_loss(logits, targets), weights)
    else:
      raise ValueError(f"seg_losses entries must be 'ce', 'dice' or 'focal', got {name!r}")
  return total


def consistency_loss(student_logits: Array, teacher_logits: Array, teacher_weights: Array,
                     kind: str) -> Array:
  """L_{student <- teacher}, weighted by the teacher's per-pixel consistency weights."""
  teacher_log_probs = lax.stop_gradient(jax.nn.log_softmax(teacher_logits, axis=-1))
  teacher_probs = jnp.exp(teacher_log_probs)
  student_log_probs = jax.nn.log_softmax(student_logits, axis=-1)
  if kind == 'ce':
    per_pixel = -jnp.sum(teacher_probs * student_log_probs, axis=-1)
  elif kind == 'kl':  # torch KLDivLoss(log_target=True), summed over class elements
    per_pixel = jnp.sum(teacher_probs * (teacher_log_probs - student_log_probs), axis=-1)
  elif kind == 'mse':
    per_pixel = jnp.sum((jnp.exp(student_log_probs) - teacher_probs) ** 2, axis=-1)
  else:
    raise ValueError(f"consistency must be 'ce', 'kl', 'mse' or 'none', got {kind!r}")
  return _weighted_mean(per_pixel, teacher_weights)


# --------------------------------------------------------------------------------------------
# The total (docs/METHOD.md §4.9-4.10) and the validation loss
# --------------------------------------------------------------------------------------------
def _check_inputs(logits_s1: Array, logits_s2: Array, labels: Array,
                  cfg: ml_collections.ConfigDict) -> None:
  validate_objective_config(cfg)
  if logits_s1.shape != logits_s2.shape:
    raise ValueError(f'logits shapes differ: {logits_s1.shape} vs {logits_s2.shape}')
  if logits_s1.ndim != 4 or logits_s1.shape[-1] != cfg.num_classes:
    raise ValueError(f'logits must be [B, H, W, {cfg.num_classes}], got {logits_s1.shape}')
  if labels.shape != logits_s1.shape[:-1]:
    raise ValueError(f'labels must be {logits_s1.shape[:-1]}, got {labels.shape}')


def _combine(logits: tuple[Array, Array], targets: Array, seg_weights: tuple[Array, Array],
             cons_weights: tuple[Array, Array],
             cfg: ml_collections.ConfigDict) -> tuple[Array, dict[str, Array]]:
  losses = tuple(cfg.seg_losses)
  seg = [segmentation_loss(z, targets, w, losses) for z, w in zip(logits, seg_weights)]
  if cfg.consistency == 'none':
    cons = [jnp.zeros((), jnp.float32)] * 2
  else:
    # L_{1<-2} is weighted by S2's weights, L_{2<-1} by S1's.
    cons = [consistency_loss(logits[0], logits[1], cons_weights[1], cfg.consistency),
            consistency_loss(logits[1], logits[0], cons_weights[0], cfg.consistency)]
  seg_loss = seg[0] + seg[1]
  cons_loss = cons[0] + cons[1]
  total = seg_loss + cfg.consistency_weight * cons_loss
  aux = {'seg_loss': seg_loss, 'cons_loss': cons_loss,
         'seg_loss_s1': seg[0], 'seg_loss_s2': seg[1],
         'cons_loss_s1': cons[0], 'cons_loss_s2': cons[1]}
  return total, aux


def cromss_loss(logits_s1: Array, logits_s2: Array, labels: Array, prior: Array | None,
                epoch: Array | float,
                cfg: ml_collections.ConfigDict) -> tuple[Array, dict[str, Any]]:
  """The CromSS training loss of one step and its diagnostics.

  Returns (loss, aux) with aux holding the per-pixel weight maps `seg_weights_s1/s2`,
  `cons_weights_s1/s2` [B, H, W], the scalars `seg_loss`, `cons_loss` (before the consistency
  weight), per-branch terms, and the schedule values `keep_ratio` and `ramp`.
  """
  _check_inputs(logits_s1, logits_s2, labels, cfg)
  logits = (logits_s1.astype(jnp.float32), logits_s2.astype(jnp.float32))
  targets = smoothed_targets(labels, prior, cfg)
  keep = keep_ratio(epoch, cfg)
  if cfg.sample_selection:
    probs = [lax.stop_gradient(jax.nn.softmax(z, axis=-1)) for z in logits]
    pred_conf = entangle(*[prediction_confidence(p, cfg.confidence) for p in probs])
    label_conf = entangle(*[label_confidence(p, labels) for p in probs])
    seg_weights = tuple(lax.stop_gradient(label_selection_weights(c, labels, keep,
                                                                  cfg.num_classes))
                        for c in label_conf)
    cons_weights = tuple(lax.stop_gradient(consistency_weights(c, epoch, cfg))
                         for c in pred_conf)
  else:
    ones = jnp.ones(labels.shape, jnp.float32)
    seg_weights = cons_weights = (ones, ones)
  total, aux = _combine(logits, targets, seg_weights, cons_weights, cfg)
  aux.update(seg_weights_s1=seg_weights[0], seg_weights_s2=seg_weights[1],
             cons_weights_s1=cons_weights[0], cons_weights_s2=cons_weights[1],
             keep_ratio=keep, ramp=ramp(epoch, cfg.ramp, cfg.ramp_epochs))
  return total, aux


def validation_loss(logits_s1: Array, logits_s2: Array, labels: Array,
                    cfg: ml_collections.ConfigDict, mask: Array | None = None) -> Array:
  """Drives the LR schedule: the same sum with all weights 1 and unsmoothed labels.

  `mask` [B, H, W] (optional) marks the pixels that count, e.g. to leave out the padding of a
  last, incomplete validation batch; every counted pixel has weight 1.
  """
  _check_inputs(logits_s1, logits_s2, labels, cfg)
  logits = (logits_s1.astype(jnp.float32), logits_s2.astype(jnp.float32))
  targets = jax.nn.one_hot(labels, cfg.num_classes, dtype=jnp.float32)
  weights = (jnp.ones(labels.shape, jnp.float32) if mask is None
             else jnp.broadcast_to(mask, labels.shape).astype(jnp.float32))
  if mask is not None:  # the Dice "class present" test must not see padded pixels either
    targets = targets * weights[..., None]
  total, _ = _combine(logits, targets, (weights, weights), (weights, weights), cfg)
  return total


# --------------------------------------------------------------------------------------------
# Spatial-temporal smoothing prior (docs/METHOD.md §4 "Spatial-temporal prior P")
# --------------------------------------------------------------------------------------------
def gaussian_kernel1d(sigma: float, truncate: float) -> Array:
  """Normalised 1-D Gaussian taps, radius int(truncate * sigma + 0.5) as scipy.ndimage."""
  radius = int(truncate * sigma + 0.5)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  taps = jnp.exp(-0.5 * (x / sigma) ** 2)
  return taps / jnp.sum(taps)


def gaussian_filter_reflect(maps: Array, sigma: float, truncate: float) -> Array:
  """Separable Gaussian over H and W of [B, H, W, C], mirrored borders (scipy 'reflect').

  Two depthwise convolutions at HIGHEST precision (no TF32), so it matches scipy to float32
  rounding on any accelerator.
  """
  taps = gaussian_kernel1d(sigma, truncate)
  radius = (taps.shape[0] - 1) // 2
  channels = maps.shape[-1]
  padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius), (0, 0)),
                   mode='symmetric')
  dims = ('NHWC', 'HWIO', 'NHWC')
  kernel_h = jnp.tile(taps[:, None, None, None], (1, 1, 1, channels))
  kernel_w = jnp.tile(taps[None, :, None, None], (1, 1, 1, channels))
  out = lax.conv_general_dilated(padded, kernel_h, (1, 1), 'VALID', dimension_numbers=dims,
                                 feature_group_count=channels,
                                 precision=lax.Precision.HIGHEST)
  return lax.conv_general_dilated(out, kernel_w, (1, 1), 'VALID', dimension_numbers=dims,
                                  feature_group_count=channels,
                                  precision=lax.Precision.HIGHEST)


def smoothing_prior(season_labels: Array, season: Array,
                    cfg: ml_collections.ConfigDict) -> Array:
  """P [B, H, W, C] from the location's seasonal label maps [B, T, H, W] and chosen season [B].

  'ts': (G(F) + G(S)) / 2 with F the temporal class frequencies and S the chosen season's
  one-hot map, each Gaussian-filtered and normalised over classes; 't': G(F); 's': G(S).
  Because G is linear and each filtered map already sums to 1 over classes, 'ts' filters
  (F + S) / 2 once (equal to the two-filter form up to float rounding).
  """
  num_classes = cfg.num_classes
  season_labels = season_labels.astype(jnp.int32)
  kind = cfg.prior_type
  maps = None
  if 't' in kind:
    maps = jnp.mean(jax.nn.one_hot(season_labels, num_classes, dtype=jnp.float32), axis=1)
  if 's' in kind:
    chosen = jnp.take_along_axis(season_labels, season.astype(jnp.int32)[:, None, None, None],
                                 axis=1)[:, 0]
    spatial = jax.nn.one_hot(chosen, num_classes, dtype=jnp.float32)
    maps = spatial if maps is None else (maps + spatial) / 2
  if maps is None:
    raise ValueError(f"prior_type must be 'ts', 't' or 's', got {kind!r}")
  sigma = cfg.prior_sigma if 'prior_sigma' in cfg else PRIOR_SIGMA
  truncate = cfg.prior_truncate if 'prior_truncate' in cfg else PRIOR_TRUNCATE
  filtered = gaussian_filter_reflect(maps, sigma, truncate)
  return filtered / jnp.sum(filtered, axis=-1, keepdims=True)
