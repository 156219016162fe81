"""Seeded DARE download (server compaction, client expand-add) under the Philox keep mask.

reference.py: the mask rule and its numpy/torch path; triton.py: the Triton kernels; cuda.py: the
compiled CUDA ops of csrc/ (schemas, fake kernels, wrappers); dispatch.py: the backend choice per
group of tensors, which server/aggregator.py and server/apply.py call.
"""
