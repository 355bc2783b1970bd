"""`python -m cromss_jax.export`: see `cromss_jax.apps.export` (the library is `cromss_jax.exports`)."""
if __name__ == '__main__':
  from cromss_jax.apps import export
  export.run()
