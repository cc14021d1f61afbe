"""Our TIR kernels for sparse layers (CSR, BSR, N:M on CPU), their formats and dispatch."""
