"""Our TIR kernels for sparse layers (CSR, BSR, N:M on CPU) and INT8 dense layers (cpu_int8), their
formats and dispatch."""
