"""The noise-robustness study: selection-quality arithmetic, and a tiny end-to-end run.

The smoke run is as small as the pipeline allows (one seed, 4 generated locations, one
pretraining step of batch 2 on 32 px crops, one transfer epoch on 64 px crops, two methods and
the no-pretraining baseline, frozen encoders only); it checks the outputs and that a rerun
resumes instead of training again.
"""
import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from cromss_jax.apps import study
from cromss_jax.tasks import ablations


def _pairwise_auc(wrong: np.ndarray, correct: np.ndarray) -> float:
  """P(w_wrong < w_correct) + P(equal) / 2 over all pairs, by brute force."""
  pairs = list(itertools.product(wrong, correct))
  return sum(1.0 if a < b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)


# ----------------------------------------------------------------------------------------------
# Selection quality on synthetic arrays
# ----------------------------------------------------------------------------------------------
def test_selection_summary_matches_hand_computation():
  # Values in distinct buckets (or exactly 1), so bucket ties are real ties.
  weights = np.array([[1.0, 1.0, 0.55, 0.205, 1.0, 0.9],
                      [0.3, 1.0, 0.05, 0.55, 0.0, 1.0]], np.float32)
  clean = np.array([[0, 1, 2, 3, 4, 5],
                    [0, 1, 2, 3, 4, 5]])
  noisy = np.array([[0, 1, 7, 3, 4, 6],       # wrong at (0,2) and (0,5)
                    [1, 1, 3, 3, 4, 5]])      # wrong at (1,0) and (1,2)
  mask = np.ones_like(clean, bool)
  mask[1, 5] = False                          # a padded pixel: must not count
  sums = ablations.selection_sums(jnp.asarray(weights), jnp.asarray(noisy), jnp.asarray(clean),
                              jnp.asarray(mask))
  summary = ablations.selection_summary({k: np.asarray(v) for k, v in sums.items()})

  counted = mask.ravel()
  w = weights.ravel()[counted]
  is_wrong = (noisy != clean).ravel()[counted]
  wrong, correct = w[is_wrong], w[~is_wrong]
  assert sorted(wrong.tolist()) == pytest.approx([0.05, 0.3, 0.55, 0.9])
  assert sorted(correct.tolist()) == pytest.approx([0.0, 0.205, 0.55, 1.0, 1.0, 1.0, 1.0])
  assert summary['mean_wrong'] == pytest.approx((0.05 + 0.3 + 0.55 + 0.9) / 4)
  assert summary['mean_correct'] == pytest.approx((0.0 + 0.205 + 0.55 + 4.0) / 7)
  assert summary['full_correct'] == pytest.approx(4 / 7)
  assert summary['full_wrong'] == 0.0
  assert summary['wrong_rate'] == pytest.approx(4 / 11)
  # By hand: 0.05 < 6 of 7, 0.3 < 5, 0.55 < 4 + tie, 0.9 < 4 -> (6 + 5 + 4.5 + 4) / 28.
  assert summary['auc'] == pytest.approx(19.5 / 28)
  assert summary['auc'] == pytest.approx(_pairwise_auc(wrong, correct))


def test_histogram_auc_extremes_and_random_scores():
  bins = ablations.SELECTION_BINS + 1
  perfect_wrong = np.zeros(bins)
  perfect_wrong[0] = 5                        # all wrong labels at weight ~0
  perfect_correct = np.zeros(bins)
  perfect_correct[-1] = 7                     # all correct labels at weight 1
  assert ablations.histogram_auc(perfect_wrong, perfect_correct) == 1.0
  assert ablations.histogram_auc(perfect_correct, perfect_wrong) == 0.0
  assert ablations.histogram_auc(perfect_wrong, perfect_wrong) == 0.5
  assert np.isnan(ablations.histogram_auc(np.zeros(bins), perfect_correct))

  rng = np.random.default_rng(0)
  # Scores on the bucket grid: the histogram AUC is then exact.
  wrong = rng.integers(0, ablations.SELECTION_BINS + 1, 40) / ablations.SELECTION_BINS
  correct = rng.integers(20, ablations.SELECTION_BINS + 1, 60) / ablations.SELECTION_BINS
  scores = np.concatenate([wrong, correct]).astype(np.float32)
  noisy = np.concatenate([np.ones(40), np.zeros(60)]).astype(np.int32)
  clean = np.zeros(100, np.int32)
  sums = ablations.selection_sums(jnp.asarray(scores), jnp.asarray(noisy), jnp.asarray(clean),
                              jnp.ones(100, bool))
  summary = ablations.selection_summary({k: np.asarray(v) for k, v in sums.items()})
  assert summary['auc'] == pytest.approx(_pairwise_auc(scores[:40], scores[40:]))
  assert summary['mean_wrong'] == pytest.approx(scores[:40].mean(), rel=1e-6)


def test_mean_std_and_settings_checks():
  assert study.mean_std([1.0, 3.0]) == (2.0, pytest.approx(np.sqrt(2.0)))
  mean, std = study.mean_std([4.0])
  assert mean == 4.0 and np.isnan(std)
  with pytest.raises(ValueError, match='Unknown methods'):
    study.StudySettings(out='x', methods=('cromss_mid', 'nope'))
  with pytest.raises(ValueError, match='Unknown transfer settings'):
    study.StudySettings(out='x', settings=('frozen', 'linear'))


# ----------------------------------------------------------------------------------------------
# End to end, tiny
# ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_tiny_study_runs_writes_reports_and_resumes(tmp_path, capsys):
  settings = study.StudySettings(
      out=str(tmp_path / 'study'), seeds=(0,), locations=4, dfc_train=4, dfc_test=2,
      epochs=1, steps_per_epoch=1, crop=32, batch=2, transfer_epochs=1, transfer_crop=64,
      methods=('s2_only', 'cromss_mid', 'random'), settings=('frozen',), val_fraction=0.25)
  results = study.run_study(settings)

  with open(os.path.join(settings.out, 'results.json')) as f:
    saved = json.load(f)
  runs = {(r['method'], r['modality'], r['setting']) for r in saved['transfer']}
  assert runs == {('s2_only', 's2', 'frozen'), ('cromss_mid', 's1', 'frozen'),
                  ('cromss_mid', 's2', 'frozen'), ('random', 's1', 'frozen'),
                  ('random', 's2', 'frozen')}
  for run in saved['transfer']:
    for metric in ('oa', 'aa', 'miou', 'mf1'):
      assert 0.0 <= run[metric] <= 100.0
  assert [r['method'] for r in saved['pretrain']] == ['s2_only', 'cromss_mid']
  single, cromss = saved['pretrain']
  assert 'miou_clean_s2' in single['final'] and 'miou_clean_s1' not in single['final']
  assert 0.0 <= cromss['final']['sel_s2_w_auc'] <= 1.0
  assert 0.0 <= cromss['final']['sel_s1_conf_auc'] <= 1.0
  assert cromss['final']['sel_keep_ratio'] <= 1.0
  assert not os.path.exists(os.path.join(settings.out, 'seed_0', 'pretrain', 'cromss_mid',
                                         'checkpoints'))

  with open(os.path.join(settings.out, 'results.md')) as f:
    report = f.read()
  for label in ('(a) S2 only', '(d) CromSS mid', '(f) no pretraining'):
    assert report.count(f'| {label} |') >= 2          # transfer table(s) + pretraining table
  assert '| S1 | (d) CromSS mid |' in report and '| S1 | (a) S2 only |' not in report
  assert 'Label-selection quality during (d) CromSS mid' in report
  for image in ('study_miou.png', 'study_selection.png'):
    assert os.path.getsize(os.path.join(settings.out, image)) > 1000

  capsys.readouterr()
  again = study.run_study(settings)                      # resumes: nothing is trained again
  assert capsys.readouterr().out.count('done before') == 8
  assert again['transfer'] == results['transfer']
  first, second = again['invocations']
  assert (first['jobs_run'], first['jobs_skipped']) == (8, 0)
  assert (second['jobs_run'], second['jobs_skipped']) == (0, 8)
