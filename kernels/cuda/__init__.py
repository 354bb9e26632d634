"""CUDA C++ kernels, compiled at first use with NVRTC through torch; nothing here is imported on CPU paths."""
