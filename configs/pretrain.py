"""CromSS pretraining on SSL4EO-S12 + Dynamic World noisy labels (paper defaults, SPEC §2-§5).

Run:  python -m cromss_jax.main --config=configs/pretrain.py --workdir=DIR \
          --config.data.dataset_dir=/path/to/converted/ssl4eo_s12_nol
Any field can be overridden from the command line, e.g. --config.objective.keep_ratio=0.3.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 42

  # --- Data (SPEC §2) -------------------------------------------------------------------------
  config.data = data = ml_collections.ConfigDict()
  # Directory written by `python -m data_prep.ssl4eo` (loadable by tfds.builder_from_directory).
  data.dataset_dir = ''
  data.s2_bands = 13            # 13 = all, 12 = drop B10, 9 = [1..7,11,12], 3 = RGB (B4,B3,B2)
  data.tile_size = 264          # stored tiles, 10 m grid
  data.crop_size = 256          # random crop for training; centre crop for validation
  data.num_seasons = 4
  data.flip = True              # independent horizontal / vertical flips, p = 0.5 each
  data.rotation = 'free'        # 'free' (paper: any angle in [-90, 90]), 'rot90', or 'none'
  data.rotation_prob = 0.2
  data.shuffle_buffer = 1024    # examples (locations) per host
  data.num_parallel_calls = -1  # tf.data.AUTOTUNE
  data.prefetch = 2             # batches
  data.cache = False            # cache decoded records in host memory (small datasets only)

  # --- Model (SPEC §3) ------------------------------------------------------------------------
  config.model = model = ml_collections.ConfigDict()
  model.encoder = 'resnet50'    # resnet18 | resnet34 | resnet50
  model.fusion = 'mid'          # mid: shared decoder, late: two U-Nets
  model.decoder_channels = (256, 128, 64, 32, 16)
  model.s1_channels = 2
  model.compute_dtype = 'bfloat16'   # bfloat16 (accelerators) | float32; parameters stay float32

  # --- Objective (SPEC §4; keys fixed by the acceptance-test contract) ----------------------
  config.objective = obj = ml_collections.ConfigDict()
  obj.num_classes = 9
  obj.seg_losses = ('ce', 'dice')     # any of 'ce', 'dice', 'focal'
  obj.consistency = 'ce'              # ce | kl | mse | none
  obj.consistency_weight = 1.0
  obj.label_smoothing = True
  obj.smoothing_factors = (0.15, 0.05)  # (prior factor a, uniform factor b); (a,) = prior only
  obj.prior_type = 'ts'               # ts | t | s
  obj.prior_sigma = 3.0
  obj.prior_truncate = 4.0
  obj.sample_selection = True
  obj.confidence = 'entropy'          # entropy | gini
  obj.ramp = 'exp'                    # exp | linear | none
  obj.ramp_epochs = 80
  obj.keep_ratio = 0.5

  # --- Optimiser and LR schedule (SPEC §5) ----------------------------------------------------
  config.optimizer = opt = ml_collections.ConfigDict()
  opt.name = 'adam'
  opt.learning_rate = 5e-3
  opt.weight_decay = 1e-8      # coupled L2: added to the gradient before Adam (as torch.optim.Adam)
  opt.b1 = 0.9
  opt.b2 = 0.999
  opt.eps = 1e-8

  config.schedule = sched = ml_collections.ConfigDict()
  sched.name = 'plateau'       # plateau (reduce on validation loss) | constant | cosine
  sched.factor = 0.5
  sched.patience = 30          # epochs
  sched.rel_threshold = 1e-4
  sched.min_lr = 0.0

  # --- Training loop ---------------------------------------------------------------------------
  config.training = train = ml_collections.ConfigDict()
  train.num_epochs = 200
  train.global_batch_size = 128
  train.val_fraction = 0.01            # share of locations held out (by location) for validation
  train.steps_per_epoch = -1           # -1: one pass over the training split
  train.eval_every_epochs = 1
  train.checkpoint_every_epochs = 10
  train.keep_checkpoints = 3
  train.log_every_steps = 50
  train.panel_every_epochs = 5         # PNG panel of a validation sample; 0 = never
  train.max_consecutive_nonfinite = 5  # stop after this many non-finite losses in a row

  # --- Device mesh (all devices of all hosts) -------------------------------------------------
  config.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1   # size of the data axis; -1 = all devices / fsdp
  mesh.fsdp = 1    # >1 shards parameters and optimiser state over this axis (FSDP-style)
  return config
