"""One process of a two-process CPU run: the CLI's flags, a fixed global batch per step."""
import dataclasses, json, os, sys
import numpy as np
from absl import flags, logging
from cromss_jax.apps import main as cli
from cromss_jax import logs

batches_path, init_path, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
flags.FLAGS(['driver'] + argv)
logging.use_absl_handler()
logs.quiet_libraries()
cli.initialise_distributed()   # --coordinator_address/--num_processes/--process_id

import jax
from cromss_jax import sharding, train
from helpers import array_digests   # tests/ is on PYTHONPATH (pretrain_run.py)
from cromss_jax.tasks import pretrain
from cromss_jax.train import state as state_lib

config = cli._CONFIG.value
workdir = cli._WORKDIR.value
task = pretrain.create_pretrain_task(config)
data = np.load(batches_path)
mesh = sharding.create_mesh(config)
# The rows of the global batch that this process's device holds.
(rows,) = sharding.batch_sharding(mesh).addressable_devices_indices_map(
    (config.training.global_batch_size,))[jax.local_devices()[0]]
print(f'process {jax.process_index()} of {jax.process_count()} feeds rows {rows}', flush=True)

def part(prefix):
  keys = {k.split('/', 1)[1] for k in data.files if k.startswith(prefix + '/')}
  return {k: data[f'{prefix}/{k}'][rows] for k in sorted(keys)}

def train_iterator(start):
  for step in range(start, 2):
    yield part(f'train{step}')

task = dataclasses.replace(
    task, data=dataclasses.replace(task.data, train_iterator=train_iterator),
    evaluation=dataclasses.replace(task.evaluation, eval_iterator=lambda: iter([part('val')])))

def name(entry):
  for attr in ('key', 'idx', 'name'):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)

# train.init_state's values (computed by the test from the same seed), placed with its
# shardings: saves compiling the init program in each process.
initial = np.load(init_path)

def init_state_from_host(learner, config, mesh, tx, plateau_tx):
  abstract, shardings = state_lib.abstract_state(learner, config, mesh, tx, plateau_tx)
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = [jax.make_array_from_process_local_data(
                s, initial['/'.join(name(e) for e in path)])
            for (path, _), s in zip(paths, jax.tree.leaves(shardings))]
  return jax.tree.unflatten(treedef, leaves), shardings

state_lib.init_state = init_state_from_host
state = train.train_and_evaluate(config, workdir, task)

# Fingerprints of this process's copy of the (replicated) state, the optimiser moments left out.
local = {'/'.join(name(e) for e in path): np.asarray(x.addressable_data(0))
         for path, x in jax.tree_util.tree_flatten_with_path(state)[0]}
local = {k: v for k, v in local.items() if not k.startswith('opt_state/')}
with open(os.path.join(workdir, f'replica_{jax.process_index()}.json'), 'w') as f:
  json.dump(array_digests(local), f)
print('DRIVER DONE', flush=True)
