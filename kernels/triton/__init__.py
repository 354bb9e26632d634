"""Triton kernels. Importing this package imports no triton: each kernel module does, when it is used."""
