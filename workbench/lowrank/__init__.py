"""Low-rank compression: factorization methods, rank allocation and its search.

- ``factor``: svd, asvd and feature factorizations of one linear, the rank rule.
- ``stats``: pooled output covariance and mean, mean absolute input.
- ``allocation``: the parameter budget; uniform, energy and search allocations.
- ``compress``: the layer-by-layer passes (dense statistics, sequential application).
- ``objective``: perplexity + weighted KL on fixed chunks, the search's objective.
- ``search``, ``search_worker``: the Optuna study, its storages and worker processes.
- ``modules``, ``merge``: the two-layer module, its rebuild, merging back to plain linears.
- ``step``: the engine's runner; ``cli``: ``workbench search``.
"""
