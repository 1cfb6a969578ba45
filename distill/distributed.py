"""Data-parallel training through DeepSpeed ZeRO, for `distill train` under torchrun or the deepspeed launcher.

One process without DeepSpeed stays the default: none of this runs unless `trainer.deepspeed` holds a DeepSpeed
config (conf/trainer/zero2.yaml, zero3.yaml). Then every rank builds the same teacher, student and data stream, takes
its own rows of each global batch (`stages.NAME.batch_size` is the global batch, the same whatever the number of
ranks), and each stage trains through a DeepSpeed engine over that stage's trainable parameters, with torch's AdamW
as the client optimizer (nothing compiles at start-up). The teacher is replicated on every rank, or partitioned over
them with ZeRO-3 (`trainer.teacher_zero3`).

Checkpoints hold both forms: DeepSpeed's own (`engine.save_checkpoint`, every rank's optimizer partition, in
CHECKPOINT/deepspeed/) and the consolidated one every distill command reads (model.safetensors, trainer.pt,
state.json). A run resumed on the same number of processes and ZeRO stage reloads DeepSpeed's, optimizer moments
included; on any other number (one process included) it starts from the consolidated weights, schedule and data
position, with fresh optimizer moments, and says so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import warnings
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError, device_named
from .models.teachers import Teacher

DS_FOLDER = "deepspeed"  # inside a checkpoint folder: DeepSpeed's own checkpoint
DS_TAG = "zero"  # its tag (DeepSpeed's sub-folder name)
DS_META = "distill.json"  # who wrote it: number of processes and ZeRO stage
OPTIMIZERS = ("auto", "torch_adamw", "fused_adam", "cpu_adam")
# Batch and schedule keys distill sets itself from each stage: given in trainer.deepspeed they would be overwritten.
OWN_KEYS = {
    "train_batch_size": "stages.NAME.batch_size (the global batch)",
    "train_micro_batch_size_per_gpu": "stages.NAME.batch_size / the number of processes",
    "gradient_accumulation_steps": "one step per global batch",
    "gradient_clipping": "stages.NAME.grad_clip",
    "optimizer": "trainer.optimizer and stages.NAME.lr / weight_decay",
    "scheduler": "stages.NAME.schedule / warmup_fraction / min_lr_ratio",
}


# -- processes ---------------------------------------------------------------------------------------------------


def world_from_env() -> tuple[int, int]:
    """(rank, world size) as the launcher (torchrun, deepspeed) set them; (0, 1) for a plain `distill train`."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return world_from_env()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(device: torch.device) -> tuple[int, int]:
    """Join the process group (NCCL on GPUs, gloo on CPUs); returns (rank, world size).

    Without a launcher (`distill train trainer=zero2` alone) this is a group of one, so that a single GPU can use
    DeepSpeed's optimizer offload."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed would build a shared-memory comm op with g++ (~40 s) on CPUs; gloo does the job.
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts, so each rank's communicator lands on its own GPU
    # DeepSpeed calls collectives that torch has renamed; the warning would repeat at every step of every rank.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)
    return rank_and_world()


def local_device(name: str) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when the trainer runs on GPUs."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = device_named(name, "trainer.device")
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ConfigError(
            f"trainer.device={name} names one GPU, but under DeepSpeed each process takes cuda:LOCAL_RANK: use "
            "trainer.device=cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
        )
    return torch.device("cuda", local_rank)


def on_main(is_main: bool, fn):
    """fn() run by rank 0 alone, its result (or the ConfigError it raised) given to every rank: one process reads
    and verifies what all must agree on (which checkpoint a resume goes on from)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return fn()
    box = [None]
    if is_main:
        try:
            box[0] = (True, fn())
        except ConfigError as err:
            box[0] = (False, str(err))
    torch.distributed.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise ConfigError(value)
    return value


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def main_process_first(is_main: bool):
    """Rank 0 runs the body first (a teacher download lands in the cache once), then the others."""
    if not is_main:
        barrier()
    yield
    if is_main:
        barrier()


# -- configuration -----------------------------------------------------------------------------------------------


def zero_stage(user: dict) -> int:
    return int((user.get("zero_optimization") or {}).get("stage", 0))


def offloads_optimizer(user: dict) -> bool:
    offload = (user.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def optimizer_kind(trainer) -> str:
    """trainer.optimizer with `auto` resolved: DeepSpeed runs an offloaded optimizer step through its CPU Adam."""
    if trainer.optimizer != "auto":
        return trainer.optimizer
    return "cpu_adam" if offloads_optimizer(trainer.deepspeed) else "torch_adamw"


def check(cfg, world: int, device: torch.device) -> None:
    """Settings that cannot work with this DeepSpeed config, world size or device, with what to change. Made before
    any process group, model or data exists, so a bad launch stops at once with one line."""
    user = cfg.trainer.deepspeed
    stage = zero_stage(user)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"trainer.deepspeed.zero_optimization.stage={stage}: use 0, 1, 2 or 3 (trainer=zero2, zero3)")
    for key, source in OWN_KEYS.items():
        if key in user:
            raise ConfigError(f"trainer.deepspeed.{key}: distill sets it from {source}; drop it from the config")
    if (user.get("fp16") or {}).get("enabled") or cfg.trainer.precision == "fp16":
        if device.type == "cpu":
            raise ConfigError(
                "trainer.deepspeed.fp16.enabled=true on the CPU, which has no fp16 training (DeepSpeed refuses it): "
                "drop the fp16 section and use trainer.precision=bf16 (or fp32)"
            )
        raise ConfigError(
            "trainer.deepspeed.fp16 is not supported: distill trains under bf16 autocast over fp32 master weights, "
            "which needs no loss scaling; drop the fp16 section and use trainer.precision=bf16"
        )
    if (user.get("bf16") or {}).get("enabled") and cfg.trainer.precision != "bf16":
        raise ConfigError(
            f"trainer.deepspeed.bf16.enabled=true but trainer.precision={cfg.trainer.precision}: distill's precision "
            "is trainer.precision (bf16 autocast over fp32 master weights); set one of them to match"
        )
    kind = optimizer_kind(cfg.trainer)
    if kind not in OPTIMIZERS:
        raise ConfigError(f"trainer.optimizer={cfg.trainer.optimizer!r}: use one of {OPTIMIZERS}")
    if offloads_optimizer(user) and kind != "cpu_adam":
        raise ConfigError(
            f"trainer.optimizer={kind} with zero_optimization.offload_optimizer: DeepSpeed runs an offloaded "
            "optimizer step through its own CPU Adam; use trainer.optimizer=auto or cpu_adam (it compiles a C++ op "
            "on first use)"
        )
    if kind == "fused_adam" and device.type != "cuda":
        raise ConfigError("trainer.optimizer=fused_adam is a CUDA kernel: use trainer.optimizer=auto on the CPU")
    if cfg.trainer.teacher_zero3 and device.type == "cpu" and cfg.teacher.dtype == "float16":
        raise ConfigError(
            "trainer.teacher_zero3 with teacher.dtype=float16 on the CPU, which DeepSpeed refuses in fp16: use "
            "teacher.dtype=bfloat16 or float32"
        )
    for name in cfg.pipeline:
        batch = cfg.stages[name].batch_size
        if batch < world:
            raise ConfigError(
                f"stages.{name}.batch_size={batch} is the global batch, split by rows over the {world} processes: "
                f"fewer rows than processes leaves some with nothing to do; use a batch_size that is a multiple of "
                f"{world}, or fewer processes"
            )
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
    # Precision is distill's own (bf16 autocast over fp32 weights), not DeepSpeed's: the module stays fp32 (check()
    # refused a bf16 section that disagrees with trainer.precision).
    config.pop("bf16", None)
    config.setdefault("steps_per_print", 10**9)
    if offloads_optimizer(user):
        # Offload means DeepSpeed's CPU Adam (check() saw to it); it takes the client optimizer as it is.
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    return config


def make_optimizer(params: list[torch.nn.Parameter], stage, trainer, device: torch.device):
    """The client optimizer handed to deepspeed.initialize, with the single-process run's hyper-parameters."""
    kwargs = dict(lr=stage.lr, betas=(0.9, 0.95), weight_decay=stage.weight_decay)
    kind = optimizer_kind(trainer)
    if kind == "fused_adam":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kwargs)
    if kind == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **kwargs)
    # torch's own kernels: fused on CUDA, foreach (multi-tensor) elsewhere; neither compiles anything.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(params, **kwargs, **fast)


# -- engines -----------------------------------------------------------------------------------------------------


def read_outside_forward(student, stage) -> list[torch.nn.Parameter]:
    """The student's parameters a stage reads directly rather than through its owner's forward. ZeRO-3 gathers a
    parameter only around the forward (and backward) of the module that owns it, so these would be empty there:
    stage 1 calls each SSD mixer's `ssd_inputs` (its conv and decay parameters, a few thousand numbers per layer;
    in_proj is gathered by its own forward), and stage 3's chunked loss multiplies by the LM head's weight itself."""
    if stage.loss == "matrix":
        return [p for idx in student.ssd_layers for p in student.mixer(idx).parameters(recurse=False)]
    if stage.loss == "logits":
        return list(student.lm_head.parameters())
    return []


_PINNED = -1  # a module id that no module has: "in use outside any forward" (see pin_whole)


def pin_whole(params: list[torch.nn.Parameter]) -> None:
    """ZeRO-3: gather these parameters (a collective; every rank pins the same ones) and keep them whole until the
    optimizer step. DeepSpeed re-partitions a gathered parameter once no module in use holds it; a tied LM head
    would be released at the end of the embedding's forward, before stage 3's loss reads it. Marking the parameter
    as held by a module that never ends keeps it; the optimizer step (DeepSpeed's release_and_reset_all) clears
    every hold and re-partitions everything, so each step pins again. Gradients and optimizer state stay
    partitioned."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    unique = list({id(p): p for p in params}.values())  # a tied weight once: it is one parameter
    gather = [p for p in unique if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if gather:
        gather[0].all_gather(param_list=gather)
    for p in unique:
        p.ds_active_sub_modules.add(_PINNED)


def initialize(student, optimizer, scheduler, config: dict, stage):
    """A DeepSpeed engine over `student` for one stage (its optimizer holds that stage's trainable parameters)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    engine.distill_pinned = read_outside_forward(student, stage) if zero_stage(config) == 3 else []
    return engine


def forward_backward(engine, step_fn, teacher, batch: torch.Tensor, precision: str, rank: int, world: int):
    """This rank's rows of the global batch through a stage's step and one backward; the StepResult's losses are
    averaged over the ranks, so they describe the global batch. engine.step() then averages the gradients over
    the ranks, clips them and runs the optimizer and schedule."""
    from .stages.common import collect_losses

    if engine.distill_pinned:
        pin_whole(engine.distill_pinned)
    with collect_losses() as losses:
        result = step_fn(engine.module, teacher, local_rows(batch, rank, world), precision)
    engine.backward(torch.stack(losses).sum())
    return average_result(result, batch.device)


class PartitionedTeacher(Teacher):
    """The frozen teacher with its weights partitioned over the ranks by ZeRO-3: each forward gathers one module's
    weights at a time (so all ranks must run the same forwards, which they do). Its LM head is a plain whole copy,
    since stage 3's chunked loss reads the head's weight directly, outside any forward."""

    def __init__(self, teacher: Teacher, engine, head: torch.nn.Module):
        self.__dict__.update(vars(teacher))
        self.engine, self._head = engine, head

    @property
    def lm_head(self) -> torch.nn.Module:
        return self._head

    def to(self, device) -> PartitionedTeacher:  # ZeRO-3 placed the partitions on this rank's device
        return self


def partition_teacher(teacher: Teacher, user: dict, device: torch.device) -> PartitionedTeacher:
    """The teacher under a second DeepSpeed engine: ZeRO-3, no optimizer. Call it after the student was built from
    the teacher's whole weights, with the teacher still on the CPU."""
    import deepspeed

    head = copy.deepcopy(teacher.model.lm_head).to(device)
    # The user's ZeRO-3 knobs apply (prefetch sizes, offload_param for a teacher that fits nowhere), not the
    # optimizer's.
    zero = {k: v for k, v in (user.get("zero_optimization") or {}).items() if not k.startswith("offload_optimizer")}
    zero["stage"] = 3
    dtype = next(teacher.model.parameters()).dtype
    config = {
        "train_micro_batch_size_per_gpu": 1,  # required by DeepSpeed's config check; nothing trains here
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        # DeepSpeed checks that the module's weights have the dtype its config names.
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    # Each weight in turn is moved to `device` and partitioned: the whole teacher never sits on one GPU (handed to
    # deepspeed.initialize as it is, it would first be moved there whole).
    deepspeed.zero.Init(module=teacher.model, config_dict_or_path=config)
    for module in teacher.model.modules():  # buffers (rotary frequencies) are not partitioned: move them too
        for key, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[key] = buffer.to(device)
    # The engine adds the hooks that gather each module's weights around its forward.
    engine, _, _, _ = deepspeed.initialize(model=teacher.model, config=config)
    return PartitionedTeacher(teacher, engine, head)


# -- per-rank batches and losses ---------------------------------------------------------------------------------


def local_rows(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's contiguous share of a global batch."""
    per = batch.shape[0] // world
    return batch[rank * per : (rank + 1) * per]


def average_result(result, device: torch.device):
    """A StepResult of floats whose loss and per-layer losses are the means over ranks (each rank saw its rows).
    The step's tensors are reduced where they are and read back once."""
    keys = sorted(result.per_layer)
    extra_keys = sorted(result.extra)
    values = [result.loss, *(result.per_layer[k] for k in keys), *(result.extra[k] for k in extra_keys)]
    t = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device).reshape(()) for v in values])
    torch.distributed.all_reduce(t)
    t = (t / torch.distributed.get_world_size()).tolist()
    result.loss = t[0]
    result.per_layer = dict(zip(keys, t[1 : 1 + len(keys)]))
    result.extra = dict(zip(extra_keys, t[1 + len(keys) :]))
    return result


# -- checkpoints -------------------------------------------------------------------------------------------------


def full_weights(model, rank: int, zero3: bool) -> dict[str, torch.Tensor] | None:
    """The model's whole weights on rank 0 (None elsewhere), named as a one-process run names them. Under ZeRO 0-2
    every rank holds them already; under ZeRO-3 each is gathered in turn (a collective: every rank calls this)."""
    if not zero3:
        return checkpoint.model_weights(model) if rank == 0 else None
    from deepspeed.runtime.zero.partition_parameters import GatheredParameters, ZeroParamStatus

    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:  # a tied weight (the LM head sharing the embeddings) is stored once, first name
            continue
        seen.add(id(tensor))
        # Whole already (a persistent parameter, or a buffer): copy it. A gather's exit would re-partition it.
        gather = getattr(tensor, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE
        with GatheredParameters([tensor]) if gather else contextlib.nullcontext():
            if rank == 0:
                out[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return out if rank == 0 else None


def save(run_dir: Path, name: str, engine, model, payload: dict | None, state, keep: int, rank: int, world: int):
    """One checkpoint in both forms, atomically: every rank writes its DeepSpeed partition into one temporary
    folder, rank 0 adds the consolidated weights, trainer.pt and state.json, renames the folder into place and only
    then points `latest` at it (after a barrier: every rank's files are complete)."""
    root = Path(run_dir) / "checkpoints"
    tmp = root / f".tmp-{name}"  # the same name on every rank: each writes its own files into it
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    engine.save_checkpoint(str(tmp / DS_FOLDER), tag=DS_TAG, save_latest=False)
    weights = full_weights(model, rank, engine.zero_optimization_stage() == 3)
    barrier()  # every rank's partition is on disk
    if rank == 0:
        with checkpoint.atomic_folder(root / name, prefix=".tmp-", tmp=tmp):
            meta = {"world_size": world, "zero_stage": engine.zero_optimization_stage(), "tag": DS_TAG}
            (tmp / DS_FOLDER / DS_META).write_text(json.dumps(meta, indent=1))
            checkpoint.write_files(tmp, weights, payload, state)
        checkpoint.point_latest(root, name, keep)
    barrier()  # nobody goes on (or resumes) before `latest` names the new checkpoint


def resume_engine(engine, folder: Path, world: int) -> str | None:
    """Load DeepSpeed's own checkpoint of `folder` into `engine` (weights, optimizer moments, schedule) when the same
    number of processes and ZeRO stage wrote it; else return why not (the caller goes on from the consolidated
    weights with fresh moments)."""
    meta_path = Path(folder) / DS_FOLDER / DS_META
    if not meta_path.exists():
        return "it was written by one process without DeepSpeed"
    meta = json.loads(meta_path.read_text())
    if meta["world_size"] != world:
        return (
            f"its optimizer state is partitioned over {meta['world_size']} processes and this run has {world} "
            "(DeepSpeed cannot re-partition it)"
        )
    stage = engine.zero_optimization_stage()
    if meta["zero_stage"] != stage:
        return f"it was written under ZeRO-{meta['zero_stage']} and this run uses ZeRO-{stage}"
    engine.load_checkpoint(
        str(Path(folder) / DS_FOLDER), tag=meta["tag"], load_optimizer_states=True, load_lr_scheduler_states=True
    )
    return None
