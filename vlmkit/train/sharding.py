"""Sharded fine-tuning driven by vlmkit (``--shard fsdp|zero2|zero3``), and the check that a launcher's
sharding request really runs.

``accelerate`` (1.x) selects FSDP and DeepSpeed only on accelerator devices: with ``Accelerator(cpu=True)``
(every CPU-only host) an FSDP config becomes ``MULTI_CPU``, i.e. plain DDP with a full copy of the model on
every rank, and a DeepSpeed config is dropped the same way, without a word. ``check_engine`` turns that into
an error that names the request, what would run and the command that works. ``--shard`` runs the engines
directly over the launcher's process group (``torchrun --nproc_per_node N``: gloo on CPU, NCCL on GPUs):

* ``fsdp`` (``FSDP2Engine``): ``torch.distributed.fsdp.fully_shard`` on every vision and decoder layer of the
  model's family (``Family.vision_layers`` / ``decoder_layers``), then on the whole ``VLMWrapper`` (embeddings,
  projector, lm_head, vlmkit stages). Each rank keeps ``1/N`` of every parameter and of the optimizer state;
  a unit's parameters are all-gathered for its forward and backward and its gradients reduce-scattered
  (averaged over ranks). Frozen base weights and LoRA weights share units (FSDP2 shards per parameter, so
  mixed ``requires_grad`` is fine). The optimizer is built after sharding, over the ``DTensor`` parameters;
  ``clip_grad_norm_`` on them computes the global norm. The final weights are gathered onto rank 0 with
  ``get_model_state_dict(full_state_dict=True, cpu_offload=True)``.
* ``zero2`` / ``zero3`` (``ZeroEngine``): ``deepspeed.initialize`` with the same AdamW, ZeRO stage 2
  (gradients and optimizer state partitioned) or 3 (parameters too), float32, the recipe's
  ``max_grad_norm`` as ``gradient_clipping`` and ``--batch-size`` as ``train_micro_batch_size_per_gpu``. On a
  CPU-only host DeepSpeed picks its CPU accelerator, which communicates over gloo (oneCCL when
  ``oneccl_bindings_for_pytorch`` is installed) and JIT-builds a small shared-memory op (needs a C++ compiler).
  ZeRO-3's final weights are gathered onto rank 0 (``_zero3_consolidated_16bit_state_dict``, which keeps
  float32 parameters float32).

Every engine computes, per step, the gradient of the mean of the ranks' losses (as DDP does), so with
equal answer-token counts per rank a run equals a single-process run on the same global batch up to float
rounding (``tests/test_sharded.py``). The adapter is saved as a plain PEFT adapter, as an unsharded run saves it.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

__all__ = ["SHARD_ENGINES", "requested_engine", "check_engine", "make_engine", "FSDP2Engine", "ZeroEngine",
           "fsdp_units", "shard_fsdp2"]

#: ``--shard`` values
SHARD_ENGINES = ("fsdp", "zero2", "zero3")

_ENGINE_ENV = {"fsdp": "ACCELERATE_USE_FSDP", "deepspeed": "ACCELERATE_USE_DEEPSPEED"}


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def requested_engine(env: Mapping[str, str] | None = None) -> str | None:
    """The sharding engine an ``accelerate launch --config_file`` asked for (``"fsdp"`` / ``"deepspeed"``),
    read from the variables accelerate's launcher sets for its processes; None when none was asked for."""
    env = os.environ if env is None else env
    for engine, var in _ENGINE_ENV.items():
        if _true(env.get(var)):
            return engine
    return None


def check_engine(distributed_type: Any, shard: str | None = None, env: Mapping[str, str] | None = None) -> None:
    """Stop when the sharding that was asked for is not what will run.

    ``distributed_type``: the accelerator's ``DistributedType`` (or its name); ``shard``: vlmkit's own
    ``--shard``. Raises RuntimeError when accelerate was configured for FSDP / DeepSpeed but its accelerator
    runs something else (on CPU: ``MULTI_CPU``, plain DDP), or when ``--shard`` is combined with an engine
    accelerate already runs; ValueError for an unknown ``shard``.
    """
    if shard is not None and shard not in SHARD_ENGINES:
        raise ValueError(f"--shard {shard!r}: expected one of {list(SHARD_ENGINES)}")
    actual = str(getattr(distributed_type, "value", distributed_type)).upper()
    asked = requested_engine(env)
    if asked is not None and actual != asked.upper():
        var = _ENGINE_ENV[asked]
        cpu_note = (" accelerate selects FSDP and DeepSpeed only on GPUs/accelerators: with --cpu or on a CPU-only "
                    "host it trains plain DDP with a full model copy on every rank instead." if actual in ("MULTI_CPU", "NO")
                    else "")
        flag = "fsdp" if asked == "fsdp" else "zero2|zero3"
        raise RuntimeError(
            f"the accelerate config asks for {asked.upper()} ({var}=true) but accelerate's accelerator runs "
            f"{actual}; vlmkit does not fall back silently.{cpu_note} On CPU let vlmkit drive the engine over gloo: "
            f"`torchrun --nproc_per_node N scripts/finetune.py --cpu --shard {flag} ...` (see adapters/README.md)"
        )
    if shard is not None and actual in ("FSDP", "DEEPSPEED"):
        raise RuntimeError(f"--shard {shard} shards with vlmkit's own engine, but accelerate already runs {actual} from "
                           "its config; use one of them (drop --shard, or launch without the accelerate config)")


def fsdp_units(wrapped) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first: the family's vision layers and decoder layers
    (``Family.vision_layers`` / ``Family.decoder_layers``); the root unit (the wrapper) comes last."""
    family = wrapped.family
    units: list[nn.Module] = []
    for name in ("vision_layers", "decoder_layers"):
        try:
            layers = getattr(family, name)
        except (AttributeError, NotImplementedError):
            continue
        units.extend(layers)
    return units


def shard_fsdp2(wrapped, world_size: int, device_type: str = "cpu") -> nn.Module:
    """``fully_shard`` every layer of ``fsdp_units(wrapped)``, then ``wrapped`` itself, over a 1-D device mesh
    of ``world_size`` ranks (the default process group). Shards in place; returns ``wrapped``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    for unit in fsdp_units(wrapped):
        fully_shard(unit, mesh=mesh)
    fully_shard(wrapped, mesh=mesh)
    return wrapped


def _need_world(shard: str, world_size: int) -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or world_size < 2:
        raise RuntimeError(f"--shard {shard} shards over the launched processes, but this run has {world_size} and "
                           f"{'a' if dist.is_available() and dist.is_initialized() else 'no'} process group; launch N >= 2 "
                           f"processes: torchrun --nproc_per_node N scripts/finetune.py --shard {shard} ...")


class FSDP2Engine:
    """``--shard fsdp``: torch FSDP2 (see the module docstring)."""

    name = "FSDP2"

    def __init__(self, world_size: int, device_type: str) -> None:
        _need_world("fsdp", world_size)
        self.world_size, self.device_type = world_size, device_type

    def prepare(self, wrapped, make_optimizer, max_grad_norm: float | None):
        """Shard ``wrapped`` in place, then build the optimizer over its sharded trainable parameters.
        Returns ``(model, optimizer, params)``."""
        shard_fsdp2(wrapped, self.world_size, self.device_type)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        self.max_grad_norm = max_grad_norm
        return wrapped, make_optimizer(params), params

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, model, optimizer, params) -> None:
        import torch

        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)  # DTensor grads: the global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_state(self, model) -> dict[str, Any]:
        """Collective: the whole state dict on rank 0 (CPU tensors), ``{}`` on the other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def local_state(self, model) -> dict[str, Any]:
        """This rank's shard of every trainable parameter (``DTensor.to_local()``)."""
        return {n: p.to_local() if hasattr(p, "to_local") else p for n, p in model.named_parameters() if p.requires_grad}


class ZeroEngine:
    """``--shard zero2`` / ``zero3``: DeepSpeed ZeRO (see the module docstring)."""

    def __init__(self, stage: int, world_size: int, batch_size: int) -> None:
        try:
            import deepspeed  # noqa: F401
        except ImportError as err:
            raise ImportError(f"--shard zero{stage} needs DeepSpeed: pip install deepspeed ({err})") from err
        _need_world(f"zero{stage}", world_size)
        self.stage, self.batch_size = stage, batch_size
        self.name = f"DeepSpeed ZeRO-{stage}"

    def config(self, max_grad_norm: float | None) -> dict[str, Any]:
        """The DeepSpeed config: float32, no offload, one micro-batch of ``--batch-size`` per step."""
        return {
            "train_micro_batch_size_per_gpu": self.batch_size, "gradient_accumulation_steps": 1,
            "gradient_clipping": float(max_grad_norm or 0.0), "zero_optimization": {"stage": self.stage},
            "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 2**31 - 1,
            "zero_allow_untested_optimizer": True,  # torch AdamW, the same optimizer as the other engines
        }

    def prepare(self, wrapped, make_optimizer, max_grad_norm: float | None):
        """``deepspeed.initialize`` over ``wrapped`` and an AdamW of its trainable parameters; the ZeRO optimizer
        keeps the AdamW's ``param_groups`` (its learning rate is set per step). Returns ``(engine, optimizer, params)``."""
        import deepspeed

        params = [p for p in wrapped.parameters() if p.requires_grad]
        optimizer = make_optimizer(params)
        self.engine, _, _, _ = deepspeed.initialize(model=wrapped, optimizer=optimizer, config=self.config(max_grad_norm))
        return self.engine, optimizer, params

    def backward(self, loss) -> None:
        self.engine.backward(loss)

    def step(self, model, optimizer, params) -> None:
        self.engine.step()  # clips to gradient_clipping, steps, zeroes the gradients

    def full_state(self, model) -> dict[str, Any]:
        """Collective under ZeRO-3: the whole state dict on rank 0; ZeRO-2 parameters are whole on every rank."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}

    def local_state(self, model) -> dict[str, Any]:
        """This rank's partition of every trainable parameter (ZeRO-3: ``ds_tensor``; ZeRO-2: whole parameters)."""
        module = self.engine.module
        return {n: getattr(p, "ds_tensor", p) for n, p in module.named_parameters() if p.requires_grad}


def make_engine(shard: str, world_size: int, device_type: str, batch_size: int):
    """The engine for ``--shard`` (``fsdp``, ``zero2``, ``zero3``)."""
    if shard == "fsdp":
        return FSDP2Engine(world_size, device_type)
    if shard in ("zero2", "zero3"):
        return ZeroEngine(int(shard[-1]), world_size, batch_size)
    raise ValueError(f"--shard {shard!r}: expected one of {list(SHARD_ENGINES)}")
