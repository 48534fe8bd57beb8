"""Weight-only integer matmuls for SwitchableLinear: :mod:`.dispatch` chooses a kernel per (bits, group size, device,
activation dtype) and packs the derived weight for it; :mod:`.cpu` and :mod:`.cuda` hold the stock-PyTorch backends,
``triton_*`` the Triton kernels (imported only when used; :mod:`.layouts` describes their packed bit-planes).
See docs/architecture.md ("Kernels") for the table of kernels and the traps they guard against."""

from .common import Packed, lookup
from .cpu import INT4_GROUPS, int4_group, pack_int4_cpu
from .dispatch import (KERNELS, check_kernel, choose, pack, pack_checked, packed_nbytes,
                       requirements)

__all__ = ["KERNELS", "INT4_GROUPS", "Packed", "check_kernel", "choose", "int4_group", "lookup", "pack", "pack_checked",
           "pack_int4_cpu", "packed_nbytes", "requirements"]
