"""Teacher -> student: build the student config and copy weights (MOHAWK's initialisation).

Embeddings, norms, MLPs, the LM head and kept attention layers are copied as they are. Each converted layer's
attention projections seed its SSD mixer: Q -> C (times the softmax scale, so C.B starts as the attention logits),
K -> B (KV heads become B groups), V -> x (repeated over the query heads of each KV group), O -> out_proj. A state
larger than the teacher's head size (student.d_state) keeps C.B, and so the function, as it was (transfer_attention).
"""

from __future__ import annotations

import torch

from ..config import ConfigError, StudentConfig
from .student import STUDENT_CLASSES, STUDENT_CONFIGS, MixerSpec, SSDMixer
from .teachers import Teacher

# Keys of the teacher's config dict that are not its architecture, so not the student's. The student's config is
# saved in every export, where each of these would mislead transformers when it loads the student:
_DROP_KEYS = (
    # The teacher's checkpoint: its classes and code (the student sets its own), the transformers that wrote it,
    # where it came from (a folder, a hub name and revision, a GGUF file's `general.name`).
    "model_type", "architectures", "auto_map", "transformers_version",
    "_name_or_path", "_model_name_or_path", "_commit_hash",
    # How the teacher was loaded: from a GGUF or otherwise quantised file (kept, it makes from_pretrained treat
    # the student's plain float weights as quantised: lm-eval refuses to load the export, and save_pretrained to
    # write the loaded model), and in teacher.dtype (the student is float32 whatever that is; set below).
    "quantization_config", "dtype", "torch_dtype",
)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mixer_spec(teacher: Teacher, cfg: StudentConfig) -> MixerSpec:
    tc = teacher.config
    h = tc.num_attention_heads
    d = head_dim(tc)
    if 0 < cfg.d_state < d:
        raise ConfigError(
            f"student.d_state={cfg.d_state} is smaller than the teacher's head size {d}: B and C start as its K and "
            f"Q, so give 0 (the head size) or at least {d}"
        )
    o_proj = getattr(teacher.model.model.layers[0].self_attn, teacher.family.o_proj)
    return MixerSpec(
        n_heads=h,
        head_dim=d,
        d_state=cfg.d_state or d,
        n_b_groups=h if cfg.b_per_head else getattr(tc, "num_key_value_heads", None) or h,
        n_c_groups=h,
        form=cfg.form,
        conv_kernel=cfg.conv_kernel,
        conv_activation=cfg.conv_activation or ("silu" if cfg.form == "mamba2" else "identity"),
        norm=cfg.norm if cfg.norm is not None else cfg.form == "mamba2",
        out_bias=o_proj.bias is not None,
        chunk_size=cfg.chunk_size,
    )


def build_student(teacher: Teacher, cfg: StudentConfig, attention_layers: list[int]):
    """A float32 student from `teacher`: every layer outside `attention_layers` becomes an SSD layer."""
    family = teacher.family
    fields = {k: v for k, v in teacher.config.to_dict().items() if k not in _DROP_KEYS}
    fields.update(
        ssd_mixer=mixer_spec(teacher, cfg).to_dict(), attention_layers=list(attention_layers), dtype=torch.float32
    )
    config = STUDENT_CONFIGS[family.name](**fields)
    config._attn_implementation = "sdpa"
    config.use_cache = True  # generate() decodes on the student's DistillCache (constant memory per SSD layer)
    student = STUDENT_CLASSES[family.name](config).float()

    # Everything the two models share by name (all but the converted attention) is copied exactly.
    teacher_state = teacher.model.state_dict()
    student_state = student.state_dict()
    shared = {k: v for k, v in teacher_state.items() if k in student_state}
    student.load_state_dict(shared, strict=False)
    if cfg.init == "transfer":
        for idx in student.ssd_layers:
            transfer_attention(teacher, idx, student.mixer(idx))
    return student


@torch.no_grad()
def transfer_attention(teacher: Teacher, idx: int, mixer: SSDMixer) -> None:
    """Seed `mixer` from teacher layer `idx`'s attention: Q -> C, K -> B, V -> x, O -> out_proj."""
    attn = teacher.model.model.layers[idx].self_attn
    fam, spec = teacher.family, mixer.spec
    q, k, v, o = (getattr(attn, name) for name in (fam.q_proj, fam.k_proj, fam.v_proj, fam.o_proj))
    d, n = q.weight.shape[0] // spec.n_heads, spec.d_state  # the teacher's query/key head size; the state size
    softmax_scale = getattr(attn, "scaling", d**-0.5)
    kv_heads = k.weight.shape[0] // d

    def repeat_heads(t: torch.Tensor, width: int, groups: int) -> torch.Tensor:
        """(kv_heads * width, ...) -> (groups * width, ...): each KV head's rows repeated for the groups it feeds."""
        return t.reshape(kv_heads, width, *t.shape[1:]).repeat_interleave(groups // kv_heads, 0).flatten(0, 1)

    def as_x(t):  # x has one head per query head
        return None if t is None else repeat_heads(t, spec.head_dim, spec.n_heads)

    def as_b(t):  # B has n_b_groups groups: the KV heads, or every head (b_per_head)
        return None if t is None else repeat_heads(t, d, spec.n_b_groups)

    def widen(t, groups: int, extra: torch.Tensor | None = None):
        """(groups * d, ...) -> (groups * n, ...): each group's d rows, then n - d rows of `extra` (or zeros)."""
        if t is None:
            return None
        t = t.float().reshape(groups, d, *t.shape[1:])
        shape = (groups, n - d, *t.shape[2:])
        extra = t.new_zeros(shape) if extra is None else extra.reshape(shape)
        return torch.cat([t, extra], 1).flatten(0, 1)

    # A state larger than the head size (n > d): C's extra rows start at zero and B's at small random values, so
    # C.B over the extra dims is 0 and the student starts as the same function as with n = d. Zero on one side
    # only: the gradient of C's extra rows is proportional to B's (nonzero at once), and B's to C's (nonzero once C
    # has moved); with both zero neither would ever get a gradient. B is the random one so that the extra state
    # dims hold something (x written through B) for C to learn to read. Seeded by the layer index: reproducible.
    gb, h = spec.n_b_groups, spec.n_heads
    g = torch.Generator().manual_seed(idx)
    # Drawn on the CPU (the same values whatever device the teacher sits on), then moved to it.
    b_extra = torch.randn(gb * (n - d), k.weight.shape[1], generator=g).to(k.weight.device) * k.weight.float().std()
    xw = mixer.x_width
    rows = {
        "x": (slice(xw, 2 * xw), as_x(v.weight), as_x(v.bias)),
        "B": (slice(2 * xw, 2 * xw + mixer.b_width), widen(as_b(k.weight), gb, b_extra), widen(as_b(k.bias), gb)),
        "C": (
            slice(2 * xw + mixer.b_width, 2 * xw + mixer.b_width + mixer.c_width),
            widen(q.weight * softmax_scale, h),
            None if q.bias is None else widen(q.bias * softmax_scale, h),
        ),
    }
    for where, weight, bias in rows.values():
        mixer.in_proj.weight[where] = weight.float()
        mixer.in_proj.bias[where] = 0.0 if bias is None else bias.float()
    mixer.out_proj.weight.copy_(o.weight.float())
    if o.bias is not None:
        mixer.out_proj.bias.copy_(o.bias.float())


@torch.no_grad()
def adopt_trained_layers(student, weights: dict[str, torch.Tensor]) -> tuple[list[int], list[int]]:
    """Copy another student's trained SSD blocks (`weights`, by name) into `student`'s SSD layers, and the tensors
    outside the layers (embeddings, final norm, LM head) where they fit. A block is taken whole or not at all: where
    the source's block is not an SSD block of this student's shape (an attention layer there), it stays as
    transferred. The blocks of `student`'s attention layers stay the teacher's. Returns (layers taken, layers left
    as transferred); refuses weights that fit no SSD layer (another mixer form, size or teacher)."""
    own = student.state_dict()
    fits = lambda k: k in weights and weights[k].shape == own[k].shape
    taken, left, copy = [], [], {k: weights[k] for k in own if not k.startswith("model.layers.") and fits(k)}
    for i in student.ssd_layers:
        prefix = f"model.layers.{i}."
        block = [k for k in own if k.startswith(prefix)]
        if all(fits(k) for k in block):
            taken.append(i)
            copy.update({k: weights[k] for k in block})
        else:
            left.append(i)
    if not taken:
        mixer = [k for k in own if k.startswith(f"model.layers.{student.ssd_layers[0]}.self_attn.")]
        why = next((k for k in mixer if not fits(k)), mixer[0])
        found = f"{list(weights[why].shape)}, not {list(own[why].shape)}" if why in weights else "missing"
        raise ConfigError(
            f"student.init_from fits no SSD layer of this student ({why}: {found}): use a run of the same teacher "
            "and student form (student.form, conv_kernel, norm, b_per_head, d_state)"
        )
    student.load_state_dict(copy, strict=False)
    return taken, left
