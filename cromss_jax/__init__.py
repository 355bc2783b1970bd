"""CromSS in JAX/Flax: cross-modal pretraining with noisy labels for remote-sensing segmentation."""
