"""Runnable backends: one per file, each lowers a captured model and runs it."""
