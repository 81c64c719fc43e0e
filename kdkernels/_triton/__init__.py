"""Triton kernels: the fused logit engine (``engine.py``) and the InfoNCE kernels (``info_nce.py``).

Run on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` is set before import.
"""
