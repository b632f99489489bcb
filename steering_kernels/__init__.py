"""Steering kernels: fused SiLU-and-mul + sparse steering add + feature gather +
activation sum.

See :mod:`steering_kernels.silu_and_mul_steer` for the math.  Importing this
package does not require triton (``HAS_TRITON`` tells whether it is available).
"""

from .gather_slots import MAX_FEATURES, gather_slots_, gather_slots_native
from .silu_and_mul_steer import (
    HAS_TRITON,
    apply_sparse_steer_,
    gather_features,
    silu_and_mul_steer,
    silu_and_mul_steer_auto,
    silu_and_mul_steer_native,
    sparse_steer_,
)
from .sum_slots import sum_slots_, sum_slots_native

__all__ = [
    "HAS_TRITON",
    "MAX_FEATURES",
    "gather_slots_",
    "gather_slots_native",
    "apply_sparse_steer_",
    "gather_features",
    "silu_and_mul_steer",
    "silu_and_mul_steer_auto",
    "silu_and_mul_steer_native",
    "sparse_steer_",
    "sum_slots_",
    "sum_slots_native",
]
