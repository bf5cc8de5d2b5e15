"""The paper's experiments, outside the installed package: one module per experiment, each with its script.

Run one from the repository root (with influencer installed), e.g. ``python -m reproductions.mislabels``;
``--help`` lists its settings. The library functions they build on are in :mod:`influencer.uses`; data
sets in :mod:`influencer.datasets`; figures in :mod:`influencer.plotting`.
"""
