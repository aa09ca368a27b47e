"""MiniMax Sparse Attention kernels (index cache, selection, sparse prefill, sparse decode)."""
