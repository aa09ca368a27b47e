"""MSA kernels: framework-free functions on torch tensors, each with a torch reference beside it.

Installed as ``m3serve.kernels`` (python/m3serve/kernels is a link to this folder).
"""
