"""Run directories: lock, cached sections, logs, outputs written as one set, the gradient store."""
