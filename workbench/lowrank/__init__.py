"""Low-rank compression: factorization methods, rank allocation and its search."""
