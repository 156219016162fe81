"""Client sparsify (spec section 1, eq. 4-8): importance scores, kurtosis ratio, exact top-k.

reference.py: the torch path (also the CPU path); grouped.py: the grouped input/output types;
triton.py (host) with triton_score.py and triton_select.py (kernels): the grouped Triton pipeline;
dispatch.py: the backend choice. No CUDA C++ version exists.
"""
