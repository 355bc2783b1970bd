"""`python -m cromss_jax.benchmark`: see `cromss_jax.apps.benchmark`."""
if __name__ == '__main__':
  from cromss_jax.apps import benchmark
  benchmark.run()
