"""`python -m cromss_jax.benchmark`: the command of `cromss_jax.apps.benchmark` (kept at this path)."""
if __name__ == '__main__':
  from absl import flags
  from cromss_jax.apps import benchmark
  __doc__ = benchmark.__doc__  # pylint: disable=redefined-builtin  (--help shows the app's usage)
  flags.adopt_module_key_flags(benchmark)
  benchmark.run()
