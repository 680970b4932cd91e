"""The "torch" backend: the pure-PyTorch reference, registered for every op.

It runs on every device and is what "auto" uses wherever no faster backend can run.
"""
from . import reference
from .backends import OPS, register

for _op in OPS:
    register("torch", _op)(getattr(reference, _op))
