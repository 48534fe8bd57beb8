"""SwitchableLinear: a Linear layer that stores an integer master and runs at any derivable bit-width."""

from __future__ import annotations

import sys
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint, core, kernels

# Default memory cap of a layer's cache of packed weights, as a multiple of the int8 master's bytes. Entries sharing
# the master (int8pack at the master's own width) cost nothing, so 8<->4 ping-pong in bf16 (0 + 0.5x) stays cached;
# the newest entry is always kept, so a float dequant copy (2-4x) still works, it just evicts the others.
CACHE_FACTOR = 2.0


class SwitchableLinear(nn.Module):
    """Linear layer holding an integer master (``weight_master``) plus float32 scales (``weight_scale``).

    Two modes:

    - **frozen** (default, inference/checkpoints): ``weight_master`` is an int8 buffer ``(out, in)`` for an 8-bit
      master, or a uint8 buffer ``(out, ceil(in/2))`` of packed nibbles for a 4-bit master. The forward uses the
      weight derived at ``self.bits``; it is cached per (bits, dtype, device) so repeated forwards re-derive nothing.
    - **training** (:meth:`to_trainable`): a float latent ``weight`` and a learnable ``weight_scale``; the forward
      fake-quantizes with STE/LSQ at ``self.bits``. :meth:`freeze` rounds the latent weight into the integer master.

    The integer tensor is deliberately *not* called ``weight``: a plain ``nn.Linear`` load of our checkpoint then
    reports a missing ``weight`` instead of casting integers to float.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        master_bits: int = core.DEFAULT_MASTER_BITS,
        candidate_bits=core.DEFAULT_CANDIDATE_BITS,
        group_size: int | None = core.DEFAULT_GROUP_SIZE,
        bits: int | None = None,
        device=None,
        dtype=None,
        cache_size: int = 2,
        kernel: str = "auto",
        cache_bytes: int | None = None,
    ):
        super().__init__()
        allowed = core.allowed_candidates(master_bits)
        core.check_group_size(group_size)
        if not candidate_bits:
            raise ValueError(f"candidate_bits must be a non-empty list drawn from {list(allowed)}")
        bad = [b for b in candidate_bits if b not in allowed]
        if bad:
            raise ValueError(f"candidate bits {bad} not derivable from a {master_bits}-bit master; allowed {list(allowed)}")
        self.in_features, self.out_features = in_features, out_features
        self.master_bits, self.group_size = master_bits, group_size
        self.candidate_bits = tuple(sorted(candidate_bits, reverse=True))
        self._bits = self.candidate_bits[0]
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict = OrderedDict()  # (bits, dtype, device) -> kernels.Packed, least recent first
        self._plans: dict = {}  # ((bits, dtype, device), kernel setting) -> (kernel chosen, its packed bytes)
        self._kernel = kernels.check_kernel(kernel)
        self._act = None  # (dtype, device) of the last forward: what set_bits packs eagerly
        self.offloaded = False  # set at load when accelerate offloads this layer (hf_quantizer.offloaded_modules)
        mdtype, mshape = checkpoint.master_layout(out_features, in_features, master_bits)
        self.register_buffer("weight_master", torch.zeros(mshape, dtype=mdtype, device=device))
        self.weight_scale = nn.Parameter(
            torch.ones(checkpoint.scale_shape(out_features, in_features, group_size), dtype=torch.float32,
                       device=device), requires_grad=False
        )
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.register_parameter("weight", None)  # latent float weight, training mode only
        # Training-only knobs, set by MultiBitTrainer (not saved): the scale-gradient factor (ALRS in accumulate mode,
        # applied inside the fake-quantize backward so it survives DDP/FSDP2 parameter wrapping) and the compiled
        # fake-quantize kernels.
        self.scale_grad_mult = 1.0
        self.fused = False
        if bits is not None:
            self.bits = bits

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, master_bits=core.DEFAULT_MASTER_BITS,
                    candidate_bits=core.DEFAULT_CANDIDATE_BITS, group_size=core.DEFAULT_GROUP_SIZE, bits=None,
                    trainable: bool = False, name: str = "") -> "SwitchableLinear":
        w = linear.weight.detach()
        if not torch.isfinite(w).all():
            raise ValueError(f"layer {name or 'linear'} has NaN or inf weights; refusing to quantize it")
        if linear.bias is not None and not torch.isfinite(linear.bias).all():
            raise ValueError(f"layer {name or 'linear'} has NaN or inf bias; refusing to quantize it")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, master_bits, candidate_bits,
                    group_size, bits, device=w.device, dtype=w.dtype)
        scale = core.init_scale(w, master_bits, group_size)
        layer.weight_scale.data.copy_(scale)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        if trainable:
            layer.weight_master = None
            layer.weight = nn.Parameter(w.clone())
            layer.weight_scale.requires_grad_(True)
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
        else:
            layer.set_master(core.quantize_master(w, scale, master_bits, group_size))
        return layer

    # ---- master access ------------------------------------------------------------------------------------------
    @property
    def trainable(self) -> bool:
        return self._parameters.get("weight") is not None  # not self.weight: nn.Module.__getattr__ is slow per switch

    @property
    def qweight(self) -> torch.Tensor:
        """The stored weight tensor. peft probes ``qweight`` before ``weight`` to place adapters on a quantized
        layer's device; our ``weight`` is ``None`` when frozen, so without this peft would crash."""
        return self.weight if self.trainable else self.weight_master

    def master(self) -> torch.Tensor:
        """The master integers as int8 ``(out, in)`` (unpacked for a 4-bit master)."""
        if self.trainable:
            return core.quantize_master(self.weight, self.weight_scale, self.master_bits, self.group_size)
        return checkpoint.decode_master(self.weight_master, self.master_bits, self.in_features)

    def set_master(self, q: torch.Tensor) -> None:
        lo, hi = core.qrange(self.master_bits)
        if q.shape != (self.out_features, self.in_features):
            raise ValueError(f"master shape {tuple(q.shape)} != {(self.out_features, self.in_features)}")
        if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
            raise ValueError(f"master values outside [{lo}, {hi}] for {self.master_bits}-bit master")
        self.weight_master = checkpoint.encode_master(q, self.master_bits).to(self.weight_scale.device)
        self.invalidate_cache()

    # ---- bit-width ----------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return self._bits

    @bits.setter
    def bits(self, value: int) -> None:
        if isinstance(value, bool) or value not in self.candidate_bits:
            raise ValueError(f"bits={value!r} is not a candidate of this layer; allowed {list(self.candidate_bits)}")
        self.__dict__["_bits"] = int(value)  # a plain int: skip nn.Module.__setattr__ (switching is per-layer Python)

    @property
    def kernel(self) -> str:
        return self._kernel

    @kernel.setter
    def kernel(self, value: str) -> None:
        if kernels.check_kernel(value) != self._kernel:
            self._kernel = value
            self.invalidate_cache()

    def invalidate_cache(self) -> None:
        self._cache.clear()
        self._plans.clear()

    def invalidate_width(self, bits: int) -> None:
        """Drop the cached packs of one width."""
        for key in [k for k in self._cache if k[0] == bits]:
            del self._cache[key]

    def derived_weight(self, bits: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """Dequantized weight at ``bits`` (default: active bits), computed without the cache."""
        b = self.bits if bits is None else bits
        if self.trainable:
            return core.fake_quantize(self.weight, self.weight_scale, self.master_bits, b, self.group_size).to(dtype)
        return core.derived_weight(self.master(), self.weight_scale, self.master_bits, b, self.group_size, dtype)

    def packed(self, dtype, device) -> kernels.Packed:
        """The active width packed for the best kernel for ``(dtype, device)``; LRU-cached, memory-capped."""
        if not isinstance(device, torch.device):
            device = torch.device(device)
        key = (self._bits, dtype, device)
        if self.offloaded:  # accelerate loads the master for each forward: keep no packed copy between them
            with torch.no_grad():
                return kernels.pack_checked(self.master(), self.weight_scale, self.master_bits, self._bits,
                                            self.group_size, dtype, device, "dequant")
        p = self._cache.get(key)
        if p is not None:
            self._cache.move_to_end(key)
            return p
        plan = self._plans.get((key, self._kernel))
        if plan is None:  # the kernel and its size depend on nothing else: a cold switch asks once per layer
            kernel = kernels.choose(self.out_features, self.in_features, self._bits, self.group_size, dtype, device,
                                    self._kernel)
            plan = self._plans[(key, self._kernel)] = (kernel, kernels.packed_nbytes(
                kernel, self.out_features, self.in_features, self.group_size, dtype))
        kernel = plan[0]
        cap = self.cache_bytes if self.cache_bytes is not None else CACHE_FACTOR * self.out_features * self.in_features
        spare = self._make_room(plan[1], kernel, cap)
        with torch.no_grad():
            p = kernels.pack_checked(self.master(), self.weight_scale, self.master_bits, self._bits, self.group_size,
                                     dtype, device, kernel, spare)
        self._cache[key] = p
        while len(self._cache) > 1 and (
            len(self._cache) > max(self.cache_size, 1) or sum(e.nbytes for e in self._cache.values()) > cap
        ):
            self._cache.popitem(last=False)
        return p

    def _make_room(self, need: int | None, kernel: str, cap) -> kernels.Packed | None:
        """Evict now, before packing, what adding an entry of ``need`` bytes will evict anyway (same rule as after
        packing), and return one evicted entry of the same kernel that nobody else holds: the new width is written
        into its buffers, so a cold switch neither faults in fresh pages nor holds both widths at once (and
        derives from the evicted width's bytes where that is exact, :mod:`.kernels.cpu_inplace`)."""
        spare = None
        if need is None:
            return spare
        while self._cache and (len(self._cache) >= max(self.cache_size, 1)
                               or sum(e.nbytes for e in self._cache.values()) + need > cap):
            _, old = self._cache.popitem(last=False)
            # 2 = `old` + getrefcount's argument: a Packed (or its fn) still held by a caller keeps its buffers
            if spare is None and old.kernel == kernel and sys.getrefcount(old) == 2 and sys.getrefcount(old.fn) == 2:
                spare = old
        return spare


    def prepare(self) -> kernels.Packed | None:
        """Pack the active width for the activation dtype/device last seen in forward (no-op before any forward)."""
        if self._act is None or self.trainable or self.offloaded:
            return None
        return self.packed(*self._act)

    # ---- training -----------------------------------------------------------------------------------------------
    def to_trainable(self) -> "SwitchableLinear":
        """Switch to training mode: latent float weight ``= q_h * s_h`` (exact master value), learnable scale."""
        if not self.trainable:
            self._install_trainable(self._latent())
        return self

    def freeze(self) -> "SwitchableLinear":
        """Round the latent weight into the integer master with the learned scale; drop the float copy."""
        if self.trainable:
            self._install_frozen(*self._rounded())
        return self

    # to_trainable / freeze in two halves, so that convert_all can compute every layer before changing any
    def _latent(self) -> torch.Tensor:
        w = core.dequantize(self.master(), self.weight_scale, self.master_bits, self.master_bits, self.group_size)
        return w.to(self.weight_scale.device)

    def _install_trainable(self, w: torch.Tensor) -> None:
        self.weight = nn.Parameter(w)
        self.weight_master = None
        self.weight_scale.requires_grad_(True)
        self.invalidate_cache()

    def _rounded(self, name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            if not torch.isfinite(self.weight).all() or not torch.isfinite(self.weight_scale).all():
                raise ValueError(f"cannot freeze {name or 'layer'}: NaN or inf in the latent weight or scale")
            scale = self.weight_scale.detach().clamp(min=torch.finfo(torch.float32).tiny)
            return core.quantize_master(self.weight, scale, self.master_bits, self.group_size), scale

    def _install_frozen(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = None
        self.weight_scale.data = scale
        self.weight_scale.requires_grad_(False)
        self.set_master(q)

    def __getstate__(self):
        # packed weights hold kernel closures (not picklable) and are rebuilt on demand: never pickle the cache
        state = super().__getstate__().copy()
        state["_cache"] = OrderedDict()
        return state

    # ---- nn.Module ----------------------------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        self.invalidate_cache()
        saved = self.weight_scale.data
        out = super()._apply(fn, recurse)
        if self.weight_scale.dtype != saved.dtype and not self.trainable:
            # model.to(bf16) must not round the frozen scales: they are part of the integer format (fp32 on disk)
            self.weight_scale.data = saved.to(self.weight_scale.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.trainable:
            self.__dict__["_act"] = (x.dtype, x.device)  # a plain attribute: skip nn.Module.__setattr__ per forward
            p = self.packed(x.dtype, x.device)
            if p.kernel != "dequant" and x.requires_grad and torch.is_grad_enabled():
                # the integer kernels have no backward; adapters (LoRA) upstream of a frozen layer need d(out)/dx
                bias = None if self.bias is None else self.bias.to(x.dtype)
                return F.linear(x, self.derived_weight(self._bits, dtype=x.dtype), bias)
            return p(x, self.bias)
        # under autocast the weight is made in the autocast dtype at once (a fused pass rounds it there), so the
        # matmul's own cast of a float32 weight, and its backward, are not paid a second time
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        w = core.fake_quantize(self.weight, self.weight_scale, self.master_bits, self._bits, self.group_size,
                               scale_grad_mult=self.scale_grad_mult, fused=self.fused, out_dtype=dtype)
        bias = self.bias
        if bias is not None and bias.dtype != w.dtype:
            bias = bias.to(w.dtype)
        return F.linear(x, w, bias)

    def extra_repr(self) -> str:
        mode = "training" if self.trainable else "frozen"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"master_bits={self.master_bits}, bits={self.bits}, candidates={list(self.candidate_bits)}, "
                f"group_size={self.group_size}, kernel={self._kernel}, {mode}")


def convert_all(layers: dict[str, SwitchableLinear], trainable: bool) -> None:
    """Every layer of ``layers`` to training mode (``trainable=True``) or frozen, or none of them: each layer's new
    tensors are computed first (a NaN/inf latent weight is refused, naming the layer), then installed."""
    if trainable:
        staged = {n: m._latent() for n, m in layers.items() if not m.trainable}
        for n, w in staged.items():
            layers[n]._install_trainable(w)
    else:
        staged = {n: m._rounded(n) for n, m in layers.items() if m.trainable}
        for n, (q, scale) in staged.items():
            layers[n]._install_frozen(q, scale)
