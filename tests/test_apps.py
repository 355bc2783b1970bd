"""Every command-line application starts as users type it (`python -m ...`): its --help works.

The commands' behaviour is tested in each module's own tests (test_train, test_export,
test_predict, ...); this catches start-up crashes (flag clashes, import errors) of each entry
point, old module paths (shims) included, which in-process `main(argv)` tests cannot.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMMANDS = {
    'cromss_jax.main': '--workdir',
    'cromss_jax.export': '--overwrite',
    'cromss_jax.import_weights': '--checkpoint',
    'cromss_jax.evaluate': '--split',
    'cromss_jax.predict': '--s2',
    'cromss_jax.models': '--depth',
    'cromss_jax.benchmark': '--compare_torch',
    'cromss_jax.demo': '--pretrain_epochs',
    'cromss_jax.study': '--dfc_train:',   # in absl's flag list only (not in the usage text)
    'data_prep.make_demo': '--locations',
    'data_prep.ssl4eo': '--labels-csv',
    'data_prep.dfc2020': '--root',
    'data_prep.ssl4eo_dwosm': '--labels',
}


@pytest.mark.parametrize('module', sorted(COMMANDS))
def test_help_starts_and_names_the_flags(module):
  proc = subprocess.run([sys.executable, '-m', module, '--help'], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)
  out = proc.stdout + proc.stderr
  # absl's --help exits with status 1 by design (argparse's with 0).
  assert proc.returncode == (0 if module.startswith('data_prep.') else 1), out[-3000:]
  assert 'Traceback' not in out, out[-3000:]
  assert COMMANDS[module] in out, out[-3000:]


def test_study_command_parses_its_flags():
  """`python -m cromss_jax.study` defines its flags before parsing them (they once were only
  listed in the usage text, and every documented invocation stopped at 'Unknown command line
  flag'): a bad value is reported as such, in one line, before anything runs."""
  proc = subprocess.run([sys.executable, '-m', 'cromss_jax.study', '--seeds=abc'], cwd=REPO,
                        capture_output=True, text=True, timeout=300, check=False)
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert lines[-1].startswith('error: flag --seeds=abc:'), proc.stderr[-3000:]

