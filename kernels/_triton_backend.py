"""The "triton" backend: imports the Triton kernel modules, each of which registers its ops.

One module per op family (kernels, host launchers, autograd.Function), named so that none shadows
a public function of the ``kernels`` package:

* ``kernels/flash_attention.py``      -> causal_attention
* ``kernels/fused_layernorm.py``      -> layer_norm (and add_layer_norm)
* ``kernels/fused_cross_entropy.py``  -> cross_entropy, linear_cross_entropy

Only imported after ``import triton`` succeeded (see ``backends._load_backend``).
"""
from . import flash_attention, fused_cross_entropy, fused_layernorm  # noqa: F401  (they register)
