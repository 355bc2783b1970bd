"""Command-line applications: thin wrappers that parse flags and call the library."""
