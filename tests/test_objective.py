"""Acceptance tests of the CromSS objective (docs/METHOD.md §4) against an independent float64 NumPy reference.

The reference below is written from docs/METHOD.md §4 (and, where it is silent, from the semantics of the
published PyTorch implementation); it never calls the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage

import jax
import jax.numpy as jnp

from configs.pretrain import get_config
from cromss_jax import config_validation
from cromss_jax import objective

RTOL = 1e-4
ATOL = 1e-5
W_ATOL = 2e-6   # weight maps live in [0, 1]

WEIGHT_KEYS = ('seg_weights_s1', 'seg_weights_s2', 'cons_weights_s1', 'cons_weights_s2')


# ==============================================================================================
# Independent float64 reference (docs/METHOD.md §4)
# ==============================================================================================
def _log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  s = z - m
  return s - np.log(np.exp(s).sum(-1, keepdims=True))


def _softmax(z):
  return np.exp(_log_softmax(z))


def ref_prediction_confidence(p, kind):
  num_classes = p.shape[-1]
  if kind == 'entropy':
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = -plogp.sum(-1)
    return np.clip(1.0 - h / np.log(num_classes), 0.0, 1.0)
  if kind == 'gini':
    return np.clip((p ** 2).sum(-1), 0.0, 1.0)
  raise ValueError(kind)


def ref_entangle(c1, c2):
  return (c1 + c1 * c2) / 2.0, (c2 + c1 * c2) / 2.0


def ref_ramp(epoch, kind, length):
  if length == 0 or kind == 'none':
    return 1.0
  e = min(max(float(epoch), 0.0), float(length))
  if kind == 'exp':
    return float(np.exp(-5.0 * (1.0 - e / length) ** 2))
  if kind == 'linear':
    return min(e / length, 1.0)
  raise ValueError(kind)


def ref_keep_ratio(epoch, cfg):
  q = float(cfg.keep_ratio)
  if epoch <= cfg.ramp_epochs:
    return 1.0 - ref_ramp(epoch, cfg.ramp, cfg.ramp_epochs) * (1.0 - q)
  return q


def ref_label_selection(lconf, labels, keep, num_classes):
  """Class-balanced label-selection weights; lconf = entangled label confidence l'."""
  if keep == 1.0:
    return np.ones_like(lconf)
  if keep == 0.0:
    return lconf.copy()
  weights = np.zeros_like(lconf)
  for c in range(num_classes):
    mask = labels == c
    n = int(mask.sum())
    if n == 0:
      continue
    m = int(np.floor(np.float32(n) * np.float32(keep)))
    if m == 0:
      weights[mask] = 0.0
      continue
    vals = lconf[mask]
    t = np.sort(vals)[::-1][m - 1]
    weights[mask] = np.minimum(vals / t, 1.0) if t > 0 else 1.0
  return weights


def ref_consistency_weights(conf, epoch, cfg):
  if epoch <= cfg.ramp_epochs:
    r = ref_ramp(epoch, cfg.ramp, cfg.ramp_epochs)
    return (1.0 - r) + r * conf
  return conf.copy()


def ref_targets(labels, prior, cfg, smooth=True):
  num_classes = cfg.num_classes
  onehot = np.eye(num_classes)[labels]
  if not (smooth and cfg.label_smoothing):
    return onehot
  factors = tuple(cfg.smoothing_factors)
  a = float(factors[0])
  if prior is None:
    return onehot * (1.0 - a) + a / num_classes
  b = float(factors[1]) if len(factors) > 1 else 0.0
  return onehot * (1.0 - a - b) + a * np.asarray(prior, np.float64) + b / num_classes


def _wmean(values, weights):
  s = weights.sum()
  return float((weights * values).sum() / s) if s > 0 else 0.0


def ref_seg_loss(z, targets, weights, losses):
  logp = _log_softmax(z)
  p = np.exp(logp)
  total = 0.0
  if 'ce' in losses:
    total += _wmean(-(targets * logp).sum(-1), weights)
  if 'dice' in losses:
    axes = tuple(range(targets.ndim - 1))
    inter = (weights[..., None] * p * targets).sum(axes)
    card = (weights[..., None] * (p + targets)).sum(axes)
    present = targets.sum(axes) > 0
    dice = (1.0 - 2.0 * inter / np.maximum(card, 1e-7)) * present
    total += float(dice.mean())
  if 'focal' in losses:
    z = np.asarray(z, np.float64)
    bce = np.maximum(z, 0.0) - z * targets + np.log1p(np.exp(-np.abs(z)))
    pt = np.exp(-bce)
    total += _wmean(((1.0 - pt) ** 2 * bce).sum(-1), weights)
  return total


def ref_consistency(z_student, teacher_probs, weights, kind):
  """Per-pixel loss pulling the student towards the (stop-gradient) teacher distribution."""
  logq = _log_softmax(z_student)
  if kind == 'ce':
    per = -(teacher_probs * logq).sum(-1)
  elif kind == 'kl':
    safe = np.where(teacher_probs > 0, teacher_probs, 1.0)
    per = np.where(teacher_probs > 0, teacher_probs * (np.log(safe) - logq), 0.0).sum(-1)
  elif kind == 'mse':
    per = ((np.exp(logq) - teacher_probs) ** 2).sum(-1)
  else:
    raise ValueError(kind)
  return _wmean(per, weights)


def ref_weights(z1, z2, labels, epoch, cfg):
  """(seg_w1, seg_w2, cons_w1, cons_w2) exactly as docs/METHOD.md §4.1-4.5 / §4.10."""
  p1, p2 = _softmax(z1), _softmax(z2)
  if not cfg.sample_selection:
    ones = np.ones(labels.shape)
    return ones, ones.copy(), ones.copy(), ones.copy()
  c1, c2 = ref_entangle(ref_prediction_confidence(p1, cfg.confidence),
                        ref_prediction_confidence(p2, cfg.confidence))
  l1 = np.take_along_axis(p1, labels[..., None], -1)[..., 0]
  l2 = np.take_along_axis(p2, labels[..., None], -1)[..., 0]
  l1, l2 = ref_entangle(l1, l2)
  keep = ref_keep_ratio(epoch, cfg)
  sw1 = ref_label_selection(l1, labels, keep, cfg.num_classes)
  sw2 = ref_label_selection(l2, labels, keep, cfg.num_classes)
  cw1 = ref_consistency_weights(c1, epoch, cfg)
  cw2 = ref_consistency_weights(c2, epoch, cfg)
  return sw1, sw2, cw1, cw2


def ref_loss_given(z1, z2, targets, weights, teacher_probs, cfg):
  """Total loss with weights, targets and teacher distributions held fixed."""
  sw1, sw2, cw1, cw2 = weights
  tp1, tp2 = teacher_probs
  losses = tuple(cfg.seg_losses)
  seg = ref_seg_loss(z1, targets, sw1, losses) + ref_seg_loss(z2, targets, sw2, losses)
  if cfg.consistency == 'none':
    cons = 0.0
  else:
    l12 = ref_consistency(z1, tp2, cw2, cfg.consistency)   # L_{1<-2}, weights of S2
    l21 = ref_consistency(z2, tp1, cw1, cfg.consistency)   # L_{2<-1}, weights of S1
    cons = l12 + l21
  return seg + cfg.consistency_weight * cons, seg, cons


def ref_cromss(z1, z2, labels, prior, epoch, cfg):
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  labels = np.asarray(labels)
  weights = ref_weights(z1, z2, labels, epoch, cfg)
  targets = ref_targets(labels, prior, cfg)
  total, seg, cons = ref_loss_given(z1, z2, targets, weights, (_softmax(z1), _softmax(z2)), cfg)
  aux = dict(zip(WEIGHT_KEYS, weights))
  aux['seg_loss'] = seg
  aux['cons_loss'] = cons
  return total, aux


def ref_validation_loss(z1, z2, labels, cfg):
  z1 = np.asarray(z1, np.float64)
  z2 = np.asarray(z2, np.float64)
  ones = np.ones(labels.shape)
  targets = ref_targets(labels, None, cfg, smooth=False)
  total, _, _ = ref_loss_given(z1, z2, targets, (ones,) * 4, (_softmax(z1), _softmax(z2)), cfg)
  return total


def ref_smoothing_prior(season_labels, season, cfg):
  season_labels = np.asarray(season_labels)
  num_classes = cfg.num_classes
  sigma = float(cfg.get('prior_sigma', 3.0))
  truncate = float(cfg.get('prior_truncate', 4.0))
  onehot = np.eye(num_classes)[season_labels]               # [B, T, H, W, C]
  freq = onehot.mean(1)
  spatial = onehot[np.arange(onehot.shape[0]), np.asarray(season)]

  def g(maps):
    out = np.empty_like(maps)
    for b in range(maps.shape[0]):
      for c in range(num_classes):
        out[b, ..., c] = scipy.ndimage.gaussian_filter(maps[b, ..., c], sigma=sigma,
                                                       truncate=truncate, mode='reflect')
    return out / out.sum(-1, keepdims=True)

  if cfg.prior_type == 'ts':
    return (g(freq) + g(spatial)) / 2.0
  if cfg.prior_type == 't':
    return g(freq)
  if cfg.prior_type == 's':
    return g(spatial)
  raise ValueError(cfg.prior_type)


# ==============================================================================================
# Helpers
# ==============================================================================================
def obj_cfg(**overrides):
  cfg = get_config().objective
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


def make_inputs(seed, b=2, h=16, w=20, c=9, scale=3.0):
  """Random logits (partly agreeing with the labels), skewed labels and a Dirichlet prior."""
  rng = np.random.default_rng(seed)
  class_p = np.array([30, 20, 12, 8, 5, 3, 1.5, 0.6, 0.3])[:c]
  class_p = class_p / class_p.sum()
  labels = rng.choice(c, size=(b, h, w), p=class_p).astype(np.int32)
  onehot = np.eye(c)[labels]
  z1 = rng.normal(size=(b, h, w, c)) * scale + 2.0 * onehot * (rng.random((b, h, w, 1)) < 0.5)
  z2 = rng.normal(size=(b, h, w, c)) * scale + 2.0 * onehot * (rng.random((b, h, w, 1)) < 0.7)
  prior = rng.dirichlet(np.full(c, 0.5), size=(b, h, w))
  return (z1.astype(np.float32), z2.astype(np.float32), labels, prior.astype(np.float32))


def run_impl(z1, z2, labels, prior, epoch, cfg):
  loss, aux = objective.cromss_loss(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels),
                                    None if prior is None else jnp.asarray(prior), epoch, cfg)
  out = {k: np.asarray(aux[k], np.float64) for k in WEIGHT_KEYS}
  out['seg_loss'] = float(aux['seg_loss'])
  out['cons_loss'] = float(aux['cons_loss'])
  return float(loss), out


def check_against_reference(z1, z2, labels, prior, epoch, cfg, rtol=RTOL, atol=ATOL):
  loss, aux = run_impl(z1, z2, labels, prior, epoch, cfg)
  ref_loss, ref_aux = ref_cromss(z1, z2, labels, prior, epoch, cfg)
  where = f'epoch={epoch}'
  for k in WEIGHT_KEYS:
    assert aux[k].shape == labels.shape, (k, aux[k].shape)
    np.testing.assert_allclose(aux[k], ref_aux[k], rtol=rtol, atol=W_ATOL,
                               err_msg=f'{k} at {where}')
  np.testing.assert_allclose(aux['seg_loss'], ref_aux['seg_loss'], rtol=rtol, atol=atol,
                             err_msg=f'seg_loss at {where}')
  np.testing.assert_allclose(aux['cons_loss'], ref_aux['cons_loss'], rtol=rtol, atol=atol,
                             err_msg=f'cons_loss at {where}')
  np.testing.assert_allclose(loss, ref_loss, rtol=rtol, atol=atol, err_msg=f'loss at {where}')
  return loss, aux, ref_loss, ref_aux


EPOCHS = (0, 37, 80, 120)

VARIANTS = {
    'default': dict(),
    'gini': dict(confidence='gini'),
    'linear': dict(ramp='linear'),
    'ramp_none': dict(ramp='none'),
    'ramp_len0': dict(ramp_epochs=0),
    'kl': dict(consistency='kl'),
    'mse': dict(consistency='mse'),
    'cons_none': dict(consistency='none'),
    'ce_only': dict(seg_losses=('ce',)),
    'dice_only': dict(seg_losses=('dice',)),
    'focal_only': dict(seg_losses=('focal',)),
    'ce_dice_focal': dict(seg_losses=('ce', 'dice', 'focal')),
    'no_smoothing': dict(label_smoothing=False),
    'one_factor': dict(smoothing_factors=(0.2,)),
    'no_selection': dict(sample_selection=False),
    'keep_quarter_lambda_half': dict(keep_ratio=0.25, consistency_weight=0.5),
    'gini_linear_kl_focal': dict(confidence='gini', ramp='linear', consistency='kl',
                                 seg_losses=('ce', 'dice', 'focal')),
    'nosel_mse_nosmooth': dict(sample_selection=False, consistency='mse',
                               label_smoothing=False, seg_losses=('ce', 'dice', 'focal')),
}


# ==============================================================================================
# 1. Formulas vs the reference
# ==============================================================================================
@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_matches_reference(name):
  cfg = obj_cfg(**VARIANTS[name])
  z1, z2, labels, prior = make_inputs(seed=len(name))
  for epoch in EPOCHS:
    check_against_reference(z1, z2, labels, prior, epoch, cfg)


@pytest.mark.parametrize('factors', [(0.15, 0.05), (0.2,)])
def test_matches_reference_without_prior(factors):
  cfg = obj_cfg(smoothing_factors=factors)
  z1, z2, labels, _ = make_inputs(seed=7)
  for epoch in (0, 120):
    check_against_reference(z1, z2, labels, None, epoch, cfg)


@pytest.mark.slow
def test_matches_reference_other_shapes():
  """Another batch shape (under jit: one compile instead of eager per-op compiles)."""
  cfg = obj_cfg(confidence='gini', seg_losses=('ce', 'dice', 'focal'))
  z1, z2, labels, prior = make_inputs(seed=11, b=3, h=8, w=24, scale=1.0)
  jitted = jax.jit(lambda a, b, y, p, e: objective.cromss_loss(a, b, y, p, e, cfg))
  for epoch in (5, 79, 81):
    loss, aux = jitted(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels), jnp.asarray(prior),
                       jnp.asarray(epoch, jnp.int32))
    ref_loss, ref_aux = ref_cromss(z1, z2, labels, prior, epoch, cfg)
    for k in WEIGHT_KEYS:
      np.testing.assert_allclose(np.asarray(aux[k], np.float64), ref_aux[k], rtol=RTOL,
                                 atol=W_ATOL, err_msg=f'{k} epoch={epoch}')
    for k in ('seg_loss', 'cons_loss'):
      np.testing.assert_allclose(float(aux[k]), ref_aux[k], rtol=RTOL, atol=ATOL,
                                 err_msg=f'{k} epoch={epoch}')
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)


def test_reference_is_sensitive():
  """Sanity of the harness: swapping the modalities or the epoch changes the result."""
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=3)
  loss, aux = run_impl(z1, z2, labels, prior, 37, cfg)
  ref_loss, ref_aux = ref_cromss(z1, z2, labels, prior, 120, cfg)
  assert abs(loss - ref_loss) > 1e-3 * abs(ref_loss)
  assert not np.allclose(aux['seg_weights_s1'], ref_aux['seg_weights_s1'], atol=1e-3)


def test_weight_semantics_spot_checks():
  """Properties that follow directly from docs/METHOD.md §4, independent of the reference code."""
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=5)
  _, aux = run_impl(z1, z2, labels, prior, 120, cfg)
  for k in WEIGHT_KEYS:
    assert np.all(aux[k] >= -1e-7) and np.all(aux[k] <= 1 + 1e-6), k
  # keep ratio 0.5 at e > L: per class with m > 0, at least m pixels get weight 1.
  for key in ('seg_weights_s1', 'seg_weights_s2'):
    for c in range(9):
      mask = labels == c
      n = int(mask.sum())
      m = n // 2
      if m == 0:
        assert np.all(aux[key][mask] == 0), (key, c)
      else:
        assert int(np.sum(aux[key][mask] >= 1 - 1e-6)) >= m, (key, c)
  # Beyond the ramp the consistency weights are the entangled confidences themselves.
  p1, p2 = _softmax(z1), _softmax(z2)
  c1 = ref_prediction_confidence(p1, 'entropy')
  c2 = ref_prediction_confidence(p2, 'entropy')
  np.testing.assert_allclose(aux['cons_weights_s1'], (c1 + c1 * c2) / 2, rtol=1e-4, atol=W_ATOL)
  np.testing.assert_allclose(aux['cons_weights_s2'], (c2 + c1 * c2) / 2, rtol=1e-4, atol=W_ATOL)


def test_validation_loss_matches_reference():
  z1, z2, labels, _ = make_inputs(seed=21)
  for overrides in (dict(), dict(consistency='kl', seg_losses=('ce', 'dice', 'focal'),
                                 consistency_weight=0.5)):
    cfg = obj_cfg(**overrides)
    got = float(objective.validation_loss(jnp.asarray(z1), jnp.asarray(z2),
                                          jnp.asarray(labels), cfg))
    want = ref_validation_loss(z1, z2, labels, cfg)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=str(overrides))
  # Equal to the training loss without selection and smoothing.
  cfg = obj_cfg(sample_selection=False, label_smoothing=False)
  train_loss, _ = run_impl(z1, z2, labels, None, 10, cfg)
  val = float(objective.validation_loss(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels),
                                        obj_cfg()))
  np.testing.assert_allclose(val, train_loss, rtol=RTOL, atol=ATOL)


def test_bfloat16_logits():
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=9)
  z1b = jnp.asarray(z1, jnp.bfloat16)
  z2b = jnp.asarray(z2, jnp.bfloat16)
  loss, aux = objective.cromss_loss(z1b, z2b, jnp.asarray(labels), jnp.asarray(prior), 37, cfg)
  ref_loss, _ = ref_cromss(np.asarray(z1b, np.float64), np.asarray(z2b, np.float64), labels,
                           prior, 37, cfg)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)


# ==============================================================================================
# 2. Edge cases
# ==============================================================================================
def test_class_with_m_zero_gets_weight_zero():
  cfg = obj_cfg()
  z1, z2, _, prior = make_inputs(seed=31)
  labels = np.zeros(z1.shape[:-1], np.int32)
  labels[0, 3, 4] = 5            # n = 1 -> m = floor(0.5) = 0
  labels[1, 0, :2] = 3           # n = 2 -> m = 1
  labels[1, 5, :3] = 7           # n = 3 -> m = 1
  _, aux, _, _ = check_against_reference(z1, z2, labels, prior, 120, cfg)
  for key in ('seg_weights_s1', 'seg_weights_s2'):
    assert aux[key][0, 3, 4] == 0.0
    assert np.max(aux[key][labels == 3]) == pytest.approx(1.0)
    assert np.max(aux[key][labels == 7]) == pytest.approx(1.0)
  # Mid-ramp (k ~ 0.88) a 1-pixel class still has m = 0.
  _, aux, _, _ = check_against_reference(z1, z2, labels, prior, 37, cfg)
  assert aux['seg_weights_s1'][0, 3, 4] == 0.0


def test_keep_ratio_one_gives_all_ones():
  cfg = obj_cfg(ramp='linear')
  z1, z2, labels, prior = make_inputs(seed=41)
  _, aux, _, _ = check_against_reference(z1, z2, labels, prior, 0, cfg)
  for k in WEIGHT_KEYS:     # r = 0: k = 1 and w_e = 1 - r + r c = 1
    np.testing.assert_array_equal(aux[k], np.ones_like(aux[k]), err_msg=k)


def test_zero_threshold_gives_weight_one():
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=51)
  labels = labels.copy()
  labels[0, :4, :5] = 4                          # 20 pixels of class 4 ...
  labels[labels == 4] = 0
  labels[0, :4, :5] = 4
  zero = np.zeros(labels.shape, bool)
  zero[0, :3, :5] = True                         # ... 15 with label confidence exactly 0
  z1[zero, 4] = -1e4
  z2[zero, 4] = -1e4
  _, aux, _, _ = check_against_reference(z1, z2, labels, prior, 120, cfg)
  for key in ('seg_weights_s1', 'seg_weights_s2'):   # m = 10, t = 0 -> all 20 weights are 1
    np.testing.assert_array_equal(aux[key][labels == 4], np.ones(20), err_msg=key)
    assert np.all(np.isfinite(aux[key]))


@pytest.mark.parametrize('smoothing', [False, True])
def test_absent_classes(smoothing):
  cfg = obj_cfg(label_smoothing=smoothing, seg_losses=('ce', 'dice'))
  z1, z2, labels, _ = make_inputs(seed=61)
  labels = labels % 3            # classes 3..8 absent
  for epoch in (37, 120):
    check_against_reference(z1, z2, labels, None, epoch, cfg)
  # Dice only, unsmoothed: absent classes add 0 but still count in the mean over C.
  cfg = obj_cfg(label_smoothing=False, seg_losses=('dice',), consistency='none',
                sample_selection=False)
  loss, _ = run_impl(z1, z2, labels, None, 0, cfg)
  assert loss <= 2 * 3 / 9 + 1e-6


def test_extreme_logits_finite():
  cfg = obj_cfg(seg_losses=('ce', 'dice', 'focal'))
  rng = np.random.default_rng(71)
  _, _, labels, prior = make_inputs(seed=71)
  z1 = rng.choice([-1e4, 1e4], size=labels.shape + (9,)).astype(np.float32)
  z2 = rng.choice([-1e4, 1e4, 0.0], size=labels.shape + (9,)).astype(np.float32)
  z1[0, 0] = -1e4                # all-equal very negative rows
  for epoch in (0, 37, 120):
    loss, aux = run_impl(z1, z2, labels, prior, epoch, cfg)
    assert np.isfinite(loss)
    assert np.isfinite(aux['seg_loss']) and np.isfinite(aux['cons_loss'])
    for k in WEIGHT_KEYS:
      assert np.all(np.isfinite(aux[k])), k


def test_extreme_logits_match_reference():
  cfg = obj_cfg(seg_losses=('ce', 'dice', 'focal'))
  rng = np.random.default_rng(72)
  _, _, labels, prior = make_inputs(seed=72)
  z1 = rng.choice([-1e4, 1e4], size=labels.shape + (9,)).astype(np.float32)
  z2 = (rng.normal(size=labels.shape + (9,)) * 3).astype(np.float32)
  z2[:, ::2] = rng.choice([-1e4, 1e4], size=z2[:, ::2].shape)
  for epoch in (37, 120):
    check_against_reference(z1, z2, labels, prior, epoch, cfg)
  for kind in ('kl', 'mse'):
    check_against_reference(z1, z2, labels, prior, 120, obj_cfg(consistency=kind))


def test_all_equal_logits():
  cfg = obj_cfg()
  _, _, labels, prior = make_inputs(seed=81)
  z = np.zeros(labels.shape + (9,), np.float32)
  loss, aux = run_impl(z, z, labels, prior, 120, cfg)
  assert np.isfinite(loss) and np.isfinite(aux['cons_loss'])
  # Entropy confidence of a uniform prediction is 0, so beyond the ramp w_e = c' = 0.
  for k in ('cons_weights_s1', 'cons_weights_s2'):
    np.testing.assert_allclose(aux[k], 0.0, atol=1e-6, err_msg=k)
  # Every label confidence is equal, so every label weight is 1.
  for k in ('seg_weights_s1', 'seg_weights_s2'):
    np.testing.assert_allclose(aux[k], 1.0, atol=1e-6, err_msg=k)
  # Mid-ramp everything is well defined: compare fully.
  _, aux, _, _ = check_against_reference(z, z, labels, prior, 37, cfg)
  np.testing.assert_allclose(aux['cons_loss'], 2 * np.log(9), rtol=RTOL)
  # Gini confidence of a uniform prediction is 1/C.
  _, aux, _, _ = check_against_reference(z, z, labels, prior, 120, obj_cfg(confidence='gini'))
  np.testing.assert_allclose(aux['cons_weights_s1'], (1 / 9 + 1 / 81) / 2, rtol=1e-5)


def test_keep_ratio_zero_gives_label_confidence():
  cfg = obj_cfg(keep_ratio=0.0)
  z1, z2, labels, prior = make_inputs(seed=91)
  _, aux, _, _ = check_against_reference(z1, z2, labels, prior, 120, cfg)
  p1, p2 = _softmax(z1), _softmax(z2)
  l1 = np.take_along_axis(p1, labels[..., None], -1)[..., 0]
  l2 = np.take_along_axis(p2, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(aux['seg_weights_s1'], (l1 + l1 * l2) / 2, rtol=1e-4, atol=W_ATOL)
  np.testing.assert_allclose(aux['seg_weights_s2'], (l2 + l1 * l2) / 2, rtol=1e-4, atol=W_ATOL)


def test_zero_weight_sum_gives_zero_term():
  """All label weights 0 (every class has m = floor(n_c * 0.001) = 0): CE term 0, not NaN."""
  cfg = obj_cfg(seg_losses=('ce',), consistency='none', keep_ratio=0.001)
  z1, z2, labels, _ = make_inputs(seed=93)
  loss, aux = run_impl(z1, z2, labels, None, 120, cfg)
  assert np.all(aux['seg_weights_s1'] == 0)
  assert loss == 0.0
  check_against_reference(z1, z2, labels, None, 120, cfg)


# ==============================================================================================
# 3. jit
# ==============================================================================================
@pytest.mark.slow
def test_jit_matches_eager_and_traces_once():
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=101)
  traces = []

  def fn(a, b, y, p, e):
    traces.append(1)
    return objective.cromss_loss(a, b, y, p, e, cfg)

  jitted = jax.jit(fn)
  args = (jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels), jnp.asarray(prior))
  for epoch in EPOCHS:
    loss_j, aux_j = jitted(*args, jnp.asarray(epoch, jnp.int32))
    loss_e, aux_e = objective.cromss_loss(*args, epoch, cfg)
    np.testing.assert_allclose(float(loss_j), float(loss_e), rtol=1e-5, atol=1e-6)
    for k in WEIGHT_KEYS + ('seg_loss', 'cons_loss'):
      np.testing.assert_allclose(np.asarray(aux_j[k]), np.asarray(aux_e[k]), rtol=1e-5,
                                 atol=1e-6, err_msg=f'{k} epoch={epoch}')
    ref_loss, _ = ref_cromss(z1, z2, labels, prior, epoch, cfg)
    np.testing.assert_allclose(float(loss_j), ref_loss, rtol=RTOL, atol=ATOL)
  assert len(traces) == 1


def test_jit_float_epoch_and_no_prior():
  cfg = obj_cfg(ramp='linear', smoothing_factors=(0.2,))
  z1, z2, labels, _ = make_inputs(seed=102)
  jitted = jax.jit(lambda a, b, y, e: objective.cromss_loss(a, b, y, None, e, cfg))
  for epoch in (37.0, 120.0):
    loss, _ = jitted(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels),
                     jnp.asarray(epoch, jnp.float32))
    ref_loss, _ = ref_cromss(z1, z2, labels, None, epoch, cfg)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=RTOL, atol=ATOL)


# ==============================================================================================
# 4. Gradients
# ==============================================================================================
def _grads(z1, z2, labels, prior, epoch, cfg):
  def f(a, b):
    return objective.cromss_loss(a, b, jnp.asarray(labels),
                                 None if prior is None else jnp.asarray(prior), epoch, cfg)[0]
  return jax.grad(f, argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))


@pytest.mark.slow
def test_gradients_finite_including_extreme_logits():
  cfg = obj_cfg(seg_losses=('ce', 'dice', 'focal'))
  z1, z2, labels, prior = make_inputs(seed=111)
  for g in _grads(z1, z2, labels, prior, 37, cfg):
    assert np.all(np.isfinite(np.asarray(g)))
  rng = np.random.default_rng(112)
  e1 = rng.choice([-1e4, 1e4], size=z1.shape).astype(np.float32)
  e2 = rng.choice([-1e4, 0.0, 1e4], size=z1.shape).astype(np.float32)
  e1[0, 0] = 0.0                 # and some uniform pixels
  for epoch, kind in ((0, 'ce'), (120, 'ce'), (120, 'kl'), (120, 'mse')):
    for g in _grads(e1, e2, labels, prior, epoch, obj_cfg(consistency=kind,
                                                         seg_losses=('ce', 'dice', 'focal'))):
      assert np.all(np.isfinite(np.asarray(g))), (epoch, kind)


@pytest.mark.slow
@pytest.mark.parametrize('key', WEIGHT_KEYS)
def test_weights_carry_no_gradient(key):
  cfg = obj_cfg()
  z1, z2, labels, prior = make_inputs(seed=121)

  def f(a, b):
    _, aux = objective.cromss_loss(a, b, jnp.asarray(labels), jnp.asarray(prior), 37, cfg)
    return jnp.sum(aux[key])

  g1, g2 = jax.grad(f, argnums=(0, 1))(jnp.asarray(z1), jnp.asarray(z2))
  assert np.all(np.asarray(g1) == 0) and np.all(np.asarray(g2) == 0)


@pytest.mark.parametrize('overrides', [dict(), dict(seg_losses=('ce', 'dice', 'focal'),
                                                    confidence='gini')])
def test_gradient_matches_reference_directional_derivative(overrides):
  """d loss / d logits with weights and the teacher distribution under stop-gradient."""
  cfg = obj_cfg(**overrides)
  z1, z2, labels, prior = make_inputs(seed=131, scale=2.0)
  epoch = 37
  g1, g2 = (np.asarray(g, np.float64) for g in _grads(z1, z2, labels, prior, epoch, cfg))
  rng = np.random.default_rng(132)
  v1 = rng.normal(size=z1.shape)
  v2 = rng.normal(size=z2.shape)
  x1 = z1.astype(np.float64)
  x2 = z2.astype(np.float64)
  frozen_w = ref_weights(x1, x2, labels, epoch, cfg)
  frozen_t = (_softmax(x1), _softmax(x2))
  targets = ref_targets(labels, prior, cfg)
  h = 1e-5

  def f(s):
    return ref_loss_given(x1 + s * v1, x2 + s * v2, targets, frozen_w, frozen_t, cfg)[0]

  want = (f(h) - f(-h)) / (2 * h)
  got = float((g1 * v1).sum() + (g2 * v2).sum())
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-5)
  # The same per modality: S1 only.
  want1 = (ref_loss_given(x1 + h * v1, x2, targets, frozen_w, frozen_t, cfg)[0]
           - ref_loss_given(x1 - h * v1, x2, targets, frozen_w, frozen_t, cfg)[0]) / (2 * h)
  np.testing.assert_allclose(float((g1 * v1).sum()), want1, rtol=2e-3, atol=1e-5)


# ==============================================================================================
# 5. Spatial-temporal prior
# ==============================================================================================
def make_season_stack(seed, b=2, t=4, h=40, w=44, c=9):
  rng = np.random.default_rng(seed)
  # Blocky maps (8x8 blocks) plus per-pixel noise, so borders and class edges both matter.
  blocks = rng.integers(0, c, size=(b, t, h // 8 + 1, w // 8 + 1))
  maps = np.repeat(np.repeat(blocks, 8, axis=2), 8, axis=3)[:, :, :h, :w]
  noise = rng.random((b, t, h, w)) < 0.2
  maps = np.where(noise, rng.integers(0, c, size=(b, t, h, w)), maps)
  season = rng.integers(0, t, size=(b,))
  return maps.astype(np.int32), season.astype(np.int32)


@pytest.mark.parametrize('prior_type', ['ts', 't', 's'])
def test_smoothing_prior_matches_scipy(prior_type):
  cfg = obj_cfg(prior_type=prior_type)
  stack, season = make_season_stack(seed=141)
  got = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(season), cfg),
                   np.float64)
  want = ref_smoothing_prior(stack, season, cfg)
  assert got.shape == (2, 40, 44, 9)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)
  assert np.all(got >= -1e-7)


def test_smoothing_prior_uses_chosen_season_and_sigma():
  stack, season = make_season_stack(seed=142)
  cfg = obj_cfg(prior_type='s')
  a = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(season), cfg))
  other = (season + 1) % 4
  b = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(other), cfg))
  np.testing.assert_allclose(b, ref_smoothing_prior(stack, other, cfg), rtol=1e-5, atol=1e-5)
  assert not np.allclose(a, b, atol=1e-3)
  cfg = obj_cfg(prior_type='ts', prior_sigma=1.5)
  got = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(season), cfg))
  np.testing.assert_allclose(got, ref_smoothing_prior(stack, season, cfg), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('transform', ['rot90', 'rot270', 'flip_h', 'flip_w'])
def test_smoothing_prior_commutes_with_flips_and_turns(transform):
  cfg = obj_cfg()
  stack, season = make_season_stack(seed=151)
  ops = {
      'rot90': (lambda x: np.rot90(x, 1, axes=(2, 3)), lambda p: np.rot90(p, 1, axes=(1, 2))),
      'rot270': (lambda x: np.rot90(x, 3, axes=(2, 3)), lambda p: np.rot90(p, 3, axes=(1, 2))),
      'flip_h': (lambda x: x[:, :, ::-1], lambda p: p[:, ::-1]),
      'flip_w': (lambda x: x[:, :, :, ::-1], lambda p: p[:, :, ::-1]),
  }
  on_stack, on_prior = ops[transform]
  base = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(season), cfg))
  moved = np.asarray(objective.smoothing_prior(
      jnp.asarray(np.ascontiguousarray(on_stack(stack))), jnp.asarray(season), cfg))
  np.testing.assert_allclose(moved, on_prior(base), rtol=1e-5, atol=1e-6)


def test_prior_feeds_loss_like_reference():
  """End to end: prior from the season stack, then the loss, both against the reference."""
  cfg = obj_cfg()
  stack, season = make_season_stack(seed=161, h=16, w=20)
  prior = np.asarray(objective.smoothing_prior(jnp.asarray(stack), jnp.asarray(season), cfg))
  ref_prior = ref_smoothing_prior(stack, season, cfg)
  labels = stack[np.arange(2), season]
  z1, z2, _, _ = make_inputs(seed=161)
  loss, _ = run_impl(z1, z2, labels, prior, 50, cfg)
  ref_loss, _ = ref_cromss(z1, z2, labels, ref_prior, 50, cfg)
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL, atol=ATOL)


# ==============================================================================================
# 6. Config validation
# ==============================================================================================
def test_default_config_is_valid():
  config_validation.validate_pretrain_config(get_config())
  config_validation.validate_objective_config(get_config().objective)


@pytest.mark.parametrize('path,value,expect', [
    ('objective.consistency', 'foo', "'ce'"),
    ('objective.confidence', 'foo', "'entropy'"),
    ('objective.ramp', 'cosine', "'exp'"),
    ('objective.keep_ratio', 1.5, '1'),
    ('objective.seg_losses', ('ce', 'bogus'), "'dice'"),
    ('objective.prior_type', 'x', "'ts'"),
    ('model.encoder', 'resnet101', "'resnet50'"),
    ('data.s2_bands', 7, '13'),
])
def test_invalid_config_is_rejected(path, value, expect):
  config = get_config()
  section, key = path.split('.')
  setattr(config[section], key, value)
  with pytest.raises(config_validation.ConfigError) as info:
    config_validation.validate_pretrain_config(config)
  message = str(info.value)
  assert path in message, message
  assert expect in message, message


def test_objective_entry_point_rejects_bad_config():
  cfg = obj_cfg(consistency='foo')
  z1, z2, labels, prior = make_inputs(seed=171, h=4, w=4)
  with pytest.raises(config_validation.ConfigError, match='objective.consistency'):
    objective.cromss_loss(jnp.asarray(z1), jnp.asarray(z2), jnp.asarray(labels),
                          jnp.asarray(prior), 0, cfg)


@pytest.mark.slow
def test_keep_ratio_is_exact_at_the_end_of_the_ramp():
  """q = 0.2 at e = L must keep floor(5 * 0.2) = 1 pixel of a 5-pixel class, not 0.

  In float32, 1 - r (1 - q) is 0.19999999 for r = 1; the reference (float64) gets 0.2.
  """
  cfg = get_config().objective
  cfg.keep_ratio = 0.2
  cfg.label_smoothing = False
  labels = np.zeros((1, 1, 5), np.int32)
  # Label confidences strictly decreasing along the row: the largest is the threshold.
  logits = np.zeros((1, 1, 5, cfg.num_classes), np.float32)
  logits[0, 0, :, 0] = np.linspace(5.0, 0.5, 5)
  _, aux = objective.cromss_loss(jnp.asarray(logits), jnp.asarray(logits), jnp.asarray(labels),
                                 None, jnp.float32(cfg.ramp_epochs), cfg)
  weights = np.asarray(aux['seg_weights_s1'])[0, 0]
  assert float(aux['keep_ratio']) == np.float32(0.2)
  assert weights[0] == 1.0
  assert np.all((weights[1:] > 0) & (weights[1:] < 1.0))
