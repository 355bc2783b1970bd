"""`python -m cromss_jax.evaluate --workdir DIR`: see `cromss_jax.apps.evaluate`."""
if __name__ == '__main__':
  from cromss_jax.apps import evaluate
  evaluate.run()
