"""One module per notebook: its config dataclass, its grid, and the claim metrics it logs.

Experiments sit above the core systems (cache, compress, speculate, engine, rlm, rvs, knowledge) and
below the harness; notebooks only call them, plot and log.
"""
