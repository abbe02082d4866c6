"""Backends run a bundle's two graphs: the VLM once per observation, the action expert per step.

A backend keeps the VLM's prefix cache where the expert reads it (device memory on an accelerator):
`prefix` returns an opaque handle, `velocity` takes it back, and the cache never crosses to numpy.
"""
