"""Reproductions of the paper's experiments: data-set builders, simulations, comparisons, figures."""
