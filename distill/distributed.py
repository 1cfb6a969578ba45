"""Data-parallel training through DeepSpeed ZeRO, for `distill train` under torchrun or the deepspeed launcher.

One process without DeepSpeed stays the default: none of this runs unless `trainer.deepspeed` holds a DeepSpeed
config (conf/trainer/zero2.yaml). Then every rank builds the same teacher, student and data stream, takes its own
rows of each global batch (`stages.NAME.batch_size` is the global batch, the same whatever the number of ranks), and
each stage trains through a DeepSpeed engine over that stage's trainable parameters, with torch's AdamW as the
client optimizer (nothing compiles at start-up). The teacher is replicated on every rank.
"""

from __future__ import annotations

import copy
import os

import torch

from .config import ConfigError


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns (rank, world size)."""
    import deepspeed

    # DeepSpeed would build a shared-memory comm op with g++ (~40 s) on CPUs; gloo does the job.
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return rank_and_world()


def local_device(name: str) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when the trainer runs on GPUs."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name if name != "auto" else "cpu")


def check(cfg, world: int) -> None:
    """Settings that cannot work at this world size, with what to change."""
    user = cfg.trainer.deepspeed
    stage = user.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(
            f"trainer.deepspeed.zero_optimization.stage={stage}: distill trains through ZeRO stages 0-2 for now "
            "(ZeRO-3 partitions the student's parameters, which the per-layer stage losses read directly): use "
            "trainer=zero2"
        )
    if user.get("fp16", {}).get("enabled"):
        raise ConfigError(
            "trainer.deepspeed.fp16 is not supported: distill keeps fp32 master weights under bf16 autocast; set "
            "trainer.precision=bf16 and drop the fp16 section"
        )
    for name in cfg.pipeline:
        batch = cfg.stages[name].batch_size
        if batch % world:
            raise ConfigError(
                f"stages.{name}.batch_size={batch} is the global batch and must divide by the {world} processes: "
                f"use a multiple of {world}"
            )


def engine_config(user: dict, stage, world: int) -> dict:
    """The DeepSpeed config of one stage: the user's (ZeRO, offload, ...) plus the batch shape and clipping."""
    config = copy.deepcopy(dict(user))
    config.update(
        train_batch_size=stage.batch_size,
        train_micro_batch_size_per_gpu=stage.batch_size // world,
        gradient_accumulation_steps=1,
        gradient_clipping=stage.grad_clip,
    )
    # Precision is distill's own (bf16 autocast over fp32 weights), not DeepSpeed's: the module stays fp32.
    config.pop("bf16", None)
    config.setdefault("steps_per_print", 10**9)
    return config


def initialize(student, optimizer, scheduler, config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    return engine


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def average_result(result, device: torch.device):
    """A StepResult whose loss and per-layer losses are the means over ranks (each rank saw its rows)."""
    keys = sorted(result.per_layer)
    extra_keys = sorted(result.extra)
    values = [result.loss, *(result.per_layer[k] for k in keys), *(result.extra[k] for k in extra_keys)]
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    t = (t / torch.distributed.get_world_size()).tolist()
    result.loss = t[0]
    result.per_layer = dict(zip(keys, t[1 : 1 + len(keys)]))
    result.extra = dict(zip(extra_keys, t[1 + len(keys) :]))
    return result


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
