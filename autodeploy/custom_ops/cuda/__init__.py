"""CUDA C++ kernels, compiled at first use by NVRTC through ``torch.cuda._compile_kernel`` (no host compiler, no
build step): each module here owns one kernel source beside it and the launch that wraps it."""
