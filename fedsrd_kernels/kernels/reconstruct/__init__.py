"""Stacked client factors from sparse uploads (spec eq. 9).

reference.py: the torch path (also the CPU path); triton.py: the Triton kernels; dispatch.py: the
backend choice. No CUDA C++ version exists.
"""
