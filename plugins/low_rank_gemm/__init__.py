"""LowRankGemm: ``Y = (X A) C`` in one launch (contract, NumPy reference, Triton kernel, TensorRT glue)."""
