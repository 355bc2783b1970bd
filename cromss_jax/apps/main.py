"""`python -m cromss_jax.main --config=configs/pretrain.py --workdir=DIR`: train (or resume).

A config with a `transfer` group runs transfer, otherwise CromSS pretraining. Rerunning the
same command resumes from the workdir's latest complete checkpoint. Exit status: 0 done,
1 a user error (one `error: ...` line), 143 preempted by SIGTERM with the state saved (rerun
to continue; job schedulers can requeue on it). Multi-host: on a Cloud TPU VM slice
`jax.distributed.initialize()` finds its peers by itself; elsewhere pass --coordinator_address,
--num_processes and --process_id.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from absl import flags
from absl import logging
from ml_collections import config_flags

from cromss_jax import cli
from cromss_jax import logs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/pretrain.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a workdir although its recorded config differs (the differing keys are logged).')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    "Call jax.distributed.initialize(): 'auto' does so on Cloud TPU VMs and when "
    '--coordinator_address is given.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process runs off TPU).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')


def _on_cloud_tpu_vm() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_ACCELERATOR_TYPE')
              or os.environ.get('CLOUD_TPU_TASK_ID'))


def initialise_distributed() -> None:
  import jax  # after flag parsing, so JAX_PLATFORMS etc. from the environment apply
  mode = _DISTRIBUTED.value
  if mode == 'off' or (mode == 'auto' and not _COORDINATOR.value and not _on_cloud_tpu_vm()):
    return
  if _COORDINATOR.value:
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  else:
    jax.distributed.initialize()
  logging.info('Process %d of %d; %d local / %d global devices.', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv: Sequence[str]) -> None:
  cli.check_command_line(argv, config=_CONFIG.value, workdir=_WORKDIR.value)
  logs.quiet_libraries()
  config = _CONFIG.value
  initialise_distributed()
  from cromss_jax import train  # pylint: disable=g-import-not-at-top
  try:
    if 'transfer' in config:
      # tf.data reads the downstream records (pretraining runs without TensorFlow); it must
      # leave the accelerators to JAX.
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      tf.config.set_visible_devices([], 'GPU')
      from cromss_jax.tasks import transfer  # pylint: disable=g-import-not-at-top
      transfer.run(config, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value)
    else:
      from cromss_jax.tasks import pretrain  # pylint: disable=g-import-not-at-top
      train.train_and_evaluate(config, _WORKDIR.value, pretrain.create_pretrain_task(config),
                               allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except train.Preempted as stopped:
    print(f'preempted: {stopped}', file=sys.stderr, flush=True)
    raise SystemExit(cli.EXIT_PREEMPTED) from None


def run() -> None:
  cli.run_absl(main)


if __name__ == '__main__':
  run()
