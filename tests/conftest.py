"""Shared by every test directory."""

# Imported here, at a shallow stack: otherwise Hypothesis's pytest plugin first imports it from
# inside the terminal summary, where CPython 3.11.7's parser trips over the deep stack
# ("AST constructor recursion depth mismatch") in runs that select no Hypothesis test.
import hypothesis  # noqa: F401
