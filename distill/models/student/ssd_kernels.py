"""Where the student finds its kernels.

Inside the distill tree they are `distill.kernels`. `distill export` writes distill/kernels/__init__.py in this
file's place, with the kernel files beside it, so an exported model runs the very same kernel code.
"""

from ...kernels import (  # noqa: F401
    causal_conv1d,
    causal_conv1d_step,
    rms_norm,
    ssd,
    ssd_decode_step,
    ssd_matrix,
    swiglu,
)
