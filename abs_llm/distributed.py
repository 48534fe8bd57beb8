"""Multi-process QAT: what MultiBitTrainer needs beyond what accelerate does by itself.

- **FSDP2 on CPU.** torch's FSDP2 (``fully_shard``) runs on CPU with the gloo backend, but accelerate (1.x) only turns
  an FSDP config into FSDP for accelerator devices: ``accelerate launch --config_file recipes/accelerate_fsdp.yaml``
  with ``use_cpu: true`` silently runs DDP (``MULTI_CPU``), and without it every process trains alone
  (``DistributedType.NO``). :func:`enable_cpu_fsdp2` switches the first case to FSDP2 (what the config asked for),
  so the sharded path is testable without a GPU; :func:`check_processes` refuses the second.
- **Per-width logs** are per process; :func:`mean_over_processes` averages them like the Trainer averages ``loss``.
- **The final checkpoint** is written from the full (gathered) state dict: under FSDP2 every parameter is a DTensor
  shard, so :func:`full_model_on_main` rebuilds a plain copy of the trained model on the main process.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch

logger = logging.getLogger(__name__)


def check_processes(accelerator) -> None:
    """A launcher started several processes but accelerate set up none of them as distributed: each would train its
    own copy into the same output folder."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise ValueError(
            f"{world} processes were launched (WORLD_SIZE={world}) but accelerate runs each one alone: on a machine "
            "without a GPU add `use_cpu: true` to the accelerate config (recipes/accelerate_cpu.yaml, or "
            "recipes/accelerate_fsdp_cpu.yaml for FSDP2), or launch one process")


def enable_cpu_fsdp2(accelerator) -> bool:
    """Upgrade a CPU multi-process run (``MULTI_CPU``, gloo) to FSDP2 when the launcher asked for FSDP version 2
    (``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION=2``); must run before ``accelerator.prepare``. Returns whether it
    did. FSDP version 1 is left alone (it needs a device)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true"
            or os.environ.get("FSDP_VERSION", "1") != "2" or state.distributed_type != DistributedType.MULTI_CPU):
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher exported
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    logger.warning("FSDP2 on CPU (gloo): accelerate would have run DDP; sharding with fully_shard instead")
    return True


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def mean_over_processes(accelerator, sums: dict) -> dict:
    """``{key: [sum, count]}`` accumulated on each process -> ``{key: sum_all / count_all}`` (keys with no count are
    left out). One all-reduce for every key together; a no-op in a single process."""
    keys = list(sums)
    t = torch.tensor([[float(sums[k][0]), float(sums[k][1])] for k in keys], dtype=torch.float64)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t.to(accelerator.device), reduction="sum").cpu()
    return {k: float(s / n) for k, (s, n) in zip(keys, t.tolist()) if n}


def full_model_on_main(accelerator, model):
    """The trained model with every FSDP2 shard gathered: all processes take part; the main process gets a plain
    (unsharded, CPU) model of the same class with the full latent weights and scales, the others ``None``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    from torch.distributed.fsdp import FSDPModule

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # an older transformers: pay for a random init instead
        no_init_weights = contextlib.nullcontext

    from .hf_quantizer import quantize

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
        return None
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))  # fully_shard subclasses the model
    with no_init_weights():  # every tensor comes from the state dict: skip the random init, zero-fill instead
        plain = cls(model.config)
    plain.tie_weights()  # the embedding and a tied lm_head share one tensor again (saved once)
    with torch.no_grad():
        for p in plain.parameters():
            p.zero_()  # so the conversion's finiteness check sees numbers, not uninitialised memory
    quantize(plain, model.config.quantization_config, trainable=True)
    plain.load_state_dict(state, strict=True)
    return plain
