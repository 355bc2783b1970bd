"""Small CromSS pretraining for the embedded demo (`make demo`): minutes on 2 CPU cores.

Same method as configs/pretrain.py, at toy scale: ResNet-18, 128 px crops, few epochs, float32.
`cromss_jax.demo` fills in data.dataset_dir after generating and converting the demo data.
"""
import ml_collections

from configs import pretrain


def get_config() -> ml_collections.ConfigDict:
  config = pretrain.get_config()
  config.data.crop_size = 128
  config.data.shuffle_buffer = 64
  config.model.encoder = 'resnet18'
  config.model.compute_dtype = 'float32'
  config.objective.ramp_epochs = 4      # the paper's ramp (80 of 200 epochs), compressed
  config.training.num_epochs = 6
  config.training.global_batch_size = 8
  # 22 training locations make 2 batches; 10 steps per epoch (the split repeats within an
  # epoch) give BatchNorm's running statistics time to settle before each evaluation.
  config.training.steps_per_epoch = 10
  # The paper's 5e-3 is for batch 128; batch 8 trains stably with a smaller step.
  config.optimizer.learning_rate = 1e-3
  config.training.val_fraction = 0.1
  config.training.checkpoint_every_epochs = 2
  config.training.log_every_steps = 2
  config.training.panel_every_epochs = 3
  config.schedule.patience = 2
  return config
