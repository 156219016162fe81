"""Seeded DARE download (server compaction, client expand-add) under the Philox keep mask.

reference.py: the mask rule and its numpy/torch path; triton.py: the Triton kernels; cuda.py: the
compiled CUDA ops of csrc/ (schemas, fake kernels, wrappers). The backend choice is made by the
callers, server/aggregator.py and server/apply.py, per group of tensors.
"""
