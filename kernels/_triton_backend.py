"""The "triton" backend: imports the Triton kernel modules, each of which registers its ops.

One module per op family (kernels, host launchers, autograd.Function), named so that none shadows
a public function of the ``kernels`` package:

* ``kernels/flash_attention.py``      -> causal_attention
* ``kernels/fused_layernorm.py``      -> layer_norm (and add_layer_norm)
* ``kernels/fused_cross_entropy.py``  -> cross_entropy, linear_cross_entropy
* ``kernels/fused_rmsnorm.py``        -> rms_norm (and add_rms_norm)
* ``kernels/fused_rope.py``           -> rope
* ``kernels/fused_swiglu.py``         -> swiglu

Only imported after ``import triton`` succeeded (see ``backends._load_backend``).
"""
from . import flash_attention, fused_cross_entropy, fused_layernorm  # noqa: F401  (they register)
from . import fused_rmsnorm  # noqa: F401  (registers rms_norm, add_rms_norm)
from . import fused_rope, fused_swiglu  # noqa: F401  (they register)
