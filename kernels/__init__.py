"""Triton kernels, importable as ``turbovideo.kernels`` (never as a bare top-level ``kernels``)."""
