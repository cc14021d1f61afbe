"""Experimental code that has never run on hardware.

``cuda_sparse24``: the CUDA 2:4 sparse tensor-core GEMM. It builds with ``nvcc``, but no session
has had a GPU to check its fragment and metadata layout numerically; do not rely on its results.
"""
