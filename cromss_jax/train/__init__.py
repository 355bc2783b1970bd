"""Training machinery shared by every task: state, optimiser, the compiled step, the loop.

A task (`cromss_jax.tasks`) says what to train as a `Task` (learner + data + evaluation);
`train_and_evaluate` runs it. `make_train_step` is the one compiled step, also used by the
benchmark and the tests.
"""
from cromss_jax.train.loop import Preempted
from cromss_jax.train.loop import sum_over_split
from cromss_jax.train.loop import train_and_evaluate
from cromss_jax.train.loop import TrainingError
from cromss_jax.train.optimizer import create_optimizer
from cromss_jax.train.optimizer import create_plateau
from cromss_jax.train.optimizer import learning_rate_fn
from cromss_jax.train.state import abstract_state
from cromss_jax.train.state import init_state
from cromss_jax.train.state import TrainState
from cromss_jax.train.step import all_finite
from cromss_jax.train.step import make_train_step
from cromss_jax.train.step import train_step
from cromss_jax.train.task import Batch
from cromss_jax.train.task import Data
from cromss_jax.train.task import Evaluation
from cromss_jax.train.task import Learner
from cromss_jax.train.task import LossFn
from cromss_jax.train.task import Task
from cromss_jax.train.task import train_everything

__all__ = [
    'Preempted',
    'sum_over_split',
    'train_and_evaluate',
    'TrainingError',
    'create_optimizer',
    'create_plateau',
    'learning_rate_fn',
    'abstract_state',
    'init_state',
    'TrainState',
    'all_finite',
    'make_train_step',
    'train_step',
    'Batch',
    'Data',
    'Evaluation',
    'Learner',
    'LossFn',
    'Task',
    'train_everything',
]
