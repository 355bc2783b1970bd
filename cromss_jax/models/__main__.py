"""`python -m cromss_jax.models`: see `cromss_jax.apps.model_summary`."""
if __name__ == '__main__':
  from cromss_jax.apps import model_summary
  model_summary.run()
