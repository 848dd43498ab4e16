"""A local cluster of real agents: `make demo` and the end-to-end tests."""
