"""LowRankSparseGemm: ``Y = (X A) C + X S``, ``S`` unstructured sparse, in one launch (contract, NumPy
reference, bitmap-tile format, Triton kernel)."""
