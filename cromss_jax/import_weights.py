"""`python -m cromss_jax.import_weights`: see `cromss_jax.apps.import_weights` (library:
`cromss_jax.torch_weights`)."""
if __name__ == '__main__':
  from cromss_jax.apps import import_weights
  import_weights.run()
