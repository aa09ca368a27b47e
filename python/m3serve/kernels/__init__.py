"""MSA kernels: framework-free functions on torch tensors, each with a torch reference beside it.

Lives in python/m3serve/kernels so that wheels ship it; the repo-root kernels/ is a link here.
"""
