"""Entry point: `python -m cromss_jax.main --config=configs/pretrain.py --workdir=DIR`.

Flags only; the work happens in `train.train_and_evaluate` (or `transfer.run` for a transfer
config). Rerunning the same command resumes from the workdir's latest complete checkpoint.
Multi-host: on a Cloud TPU VM slice `jax.distributed.initialize()` finds its peers by itself;
elsewhere pass --coordinator_address, --num_processes and --process_id.
"""
from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from cromss_jax import logs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file, e.g. configs/pretrain.py.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and exports.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    "Call jax.distributed.initialize(): 'auto' does so on Cloud TPU VMs and when "
    '--coordinator_address is given.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 (multi-process runs off TPU).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0-based).')
flags.mark_flags_as_required(['config', 'workdir'])


def _on_cloud_tpu_vm() -> bool:
  return bool(os.environ.get('TPU_WORKER_HOSTNAMES') or os.environ.get('TPU_ACCELERATOR_TYPE')
              or os.environ.get('CLOUD_TPU_TASK_ID'))


def _initialise_distributed() -> None:
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logs.quiet_libraries()
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # tf.data only: keep accelerators for JAX
  _initialise_distributed()
  config = _CONFIG.value
  if 'transfer' in config:
    from cromss_jax import transfer
    transfer.run(config, _WORKDIR.value)
  else:
    from cromss_jax import train
    train.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
