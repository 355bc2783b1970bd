"""`python -m cromss_jax.study`: see `cromss_jax.apps.study`."""
if __name__ == '__main__':
  from cromss_jax.apps import study
  study.run()
