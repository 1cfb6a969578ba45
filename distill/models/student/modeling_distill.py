"""The student: a teacher architecture whose attention layers are replaced by SSD (Mamba-2) mixers.

This file is the one student code path: training uses it, and `distill export` copies it (with the configuration
file and the kernel files) as the remote code of an exported model. It imports nothing from the rest of `distill`
except the kernels, which an export places beside it.

A student class subclasses the teacher family's own `...ForCausalLM` and swaps `layers[i].self_attn` for an
`SSDMixer` on every layer not listed in `config.attention_layers`. Everything else (embeddings, norms, MLPs, the LM
head, the kept attention layers, generation) is the teacher family's code, so the student's weights carry the
teacher's names and a hybrid's attention layers are exactly the teacher's.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer
from transformers.modeling_utils import AttentionInterface
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaMLP, LlamaRMSNorm
from transformers.models.phi.modeling_phi import PhiForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2ForCausalLM, Qwen2MLP, Qwen2RMSNorm

from .configuration_distill import DistillLlamaConfig, DistillPhiConfig, DistillQwen2Config, MixerSpec
from .ssd_kernels import causal_conv1d, causal_conv1d_step, rms_norm, ssd, ssd_decode_step, ssd_matrix, swiglu

# transformers renamed the cache argument of its models' forwards, and the output field, from `past_key_values` to
# `cache` (5.2x releases); the student takes either and speaks the installed version's own.
CACHE_ARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass
class SSDInputs:
    """What the mixer feeds the SSD kernel, in the kernel layout (batch, length, heads, dim)."""

    x: torch.Tensor  # (b, L, h, p)
    log_a: torch.Tensor  # (b, L, h), float32
    B: torch.Tensor  # (b, L, gb, n)
    C: torch.Tensor  # (b, L, gc, n)
    scale: torch.Tensor | None  # (b, L, h) float32 in the Mamba-2 form, None in the discrete form
    z: torch.Tensor  # (b, L, h * p), the gate's input


class SSDLayerState(DynamicLayer):
    """An SSD layer's slot in the generation cache: its conv state (b, c, k-1) and SSM state (b, h, p, n), float32.

    Constant memory whatever the length. It counts the tokens it has seen and reports that count as its sequence
    length, like an attention layer's KV cache would, so the cache's length and the attention masks built from any
    layer (the mask code asks the first layer) are right in pure and hybrid students alike.
    """

    is_croppable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv_state: torch.Tensor | None = None
        self.ssm_state: torch.Tensor | None = None
        self.seen = 0

    def get_seq_length(self) -> int:
        return self.seen

    def reset(self) -> None:
        self.conv_state = self.ssm_state = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.conv_state is not None:
            self.conv_state = self.conv_state.index_select(0, beam_idx.to(self.conv_state.device))
            self.ssm_state = self.ssm_state.index_select(0, beam_idx.to(self.ssm_state.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.conv_state is not None:
            self.conv_state = self.conv_state.repeat_interleave(repeats, dim=0)
            self.ssm_state = self.ssm_state.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.conv_state is not None:
            self.conv_state, self.ssm_state = self.conv_state[indices], self.ssm_state[indices]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("an SSD state cannot be cropped: it keeps no per-token history")


class DistillCache(Cache):
    """The student's generation cache: an SSDLayerState per SSD layer, a growing KV cache per kept attention layer."""

    def __init__(self, config):
        keep = set(config.attention_layers or [])
        layers = [DynamicLayer() if i in keep else SSDLayerState() for i in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        # The generation's 2-D attention mask (b, tokens so far), set by the model's forward: left padding must not
        # enter an SSD state.
        self.padding_mask: torch.Tensor | None = None


def padded_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiple: int, keep_padding: bool = False
) -> torch.Tensor:
    """F.linear(x, weight, bias) computed with the output width padded by zero rows to a multiple of `multiple`,
    then sliced back: the same values (and gradients: the pad's rows get none), on aligned GEMM shapes.
    `keep_padding`: return the padded width (its last columns zero) for a caller that splits it anyway."""
    pad = -weight.shape[0] % multiple
    if pad == 0:
        return F.linear(x, weight, bias)
    bias = None if bias is None else F.pad(bias, (0, pad))
    out = F.linear(x, F.pad(weight, (0, 0, 0, pad)), bias)
    return out if keep_padding else out[..., : weight.shape[0]]


class AlignedLinear(nn.Linear):
    """nn.Linear whose product runs, on CUDA, with the output width padded to a multiple of 64.

    Why: in_proj's width (z, x, B, C and one decay channel per head: 1,929 for SmolLM2-135M's students) is odd, and
    cuBLAS gives such a product and its two gradients slow kernels: a stage-3 profile on the H200 (2026-12-01) spent
    62 of 341 ms a step in one CUTLASS kernel family launched 92 times, three per layer, while the step's aligned
    products ran on cuBLAS's Hopper kernels; in_proj's product and two gradients are its only odd-width ones (an
    inference: the padded step is not yet profiled). The parameter keeps its shape (checkpoints and exports are unchanged) and the
    padding costs one copy of the weight a call; the output is a view whose rows start 64-aligned. A module, not a
    function on the weight, so ZeRO-3 gathers the weight around its forward as for any nn.Linear.
    """

    align = 64

    def pad_width(self, x: torch.Tensor) -> int:
        """How many zero columns this input's product carries past out_features (none off CUDA)."""
        return -self.out_features % self.align if x.is_cuda else 0

    def forward(self, x: torch.Tensor, keep_padding: bool = False) -> torch.Tensor:
        """y = x W^T + b; `keep_padding`: y with its pad_width(x) zero columns still on (see SSDMixer._project)."""
        if self.pad_width(x) == 0:
            return super().forward(x)
        return padded_linear(x, self.weight, self.bias, self.align, keep_padding)


class KernelRMSNorm(nn.Module):
    """The Llama family's RMSNorm (Llama, Qwen2) computed by distill's kernel: the same parameter, the same function.

    Built from the family's module, whose `weight` it takes over (state-dict names unchanged); on CUDA one fused
    kernel each way instead of about sixteen eager elementwise passes, elsewhere the family's own arithmetic.

    `feeds_products`: the output goes only into linear layers (a decoder layer's two norms: attention or mixer
    projections, the MLP's gate and up). Under autocast those round it to the autocast dtype anyway, so the norm
    writes it in that dtype at once: the same values, with no float32 copy for each consumer to cast (gate and up
    each cast it: three casts a layer forward and three back, six of the eight casts of the (16, 2048, 576) stream
    a layer that took 9.2 of a stage-3 step's 172 ms of kernel time on the H200 profile of 2026-12-04). The
    gradient then arrives in bf16, gate's and up's summed in bf16. Off autocast, and for the final norm (whose
    output stage 3 reads as hidden states), the family's dtype.
    """

    def __init__(self, norm: nn.Module, feeds_products: bool = False):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.feeds_products = feeds_products

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        device = hidden_states.device.type
        out_dtype = None
        if self.feeds_products and torch.is_autocast_enabled(device):
            out_dtype = torch.get_autocast_dtype(device)
        return rms_norm(hidden_states, self.weight, self.variance_epsilon, out_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class KernelGatedMLP(nn.Module):
    """The family's gated MLP, down(silu(gate(x)) * up(x)), with the gate through distill's fused SwiGLU kernel.

    Takes over the family's three projections (state-dict names unchanged).
    """

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


_KERNEL_NORMS = (LlamaRMSNorm, Qwen2RMSNorm)
_LAYER_NORM_NAMES = ("input_layernorm", "post_attention_layernorm")  # a decoder layer's: they feed products only
_KERNEL_MLPS = (LlamaMLP, Qwen2MLP)


def use_block_kernels(model: nn.Module) -> nn.Module:
    """Swap a Llama-family model's RMSNorms and silu-gated MLPs for the kernel-backed modules above, in place.

    The same parameters and the same function (tested against the family's modules), so a teacher or a student
    computes what it did, with fewer passes over its activations. Other families (Phi's LayerNorm and GELU MLP) are
    left as they are. Returns the model.
    """
    silu = getattr(model.config, "hidden_act", None) == "silu"
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in _KERNEL_NORMS:
                setattr(parent, name, KernelRMSNorm(child, feeds_products=name in _LAYER_NORM_NAMES))
            elif type(child) in _KERNEL_MLPS and silu:
                setattr(parent, name, KernelGatedMLP(child))
    return model


class RMSNorm(nn.Module):
    """RMSNorm over the whole inner width (the Mamba-2 form's output norm, applied before the gate), in y's dtype.

    Through the family norm's kernel (one pass each way on CUDA; eagerly it was about sixteen elementwise passes
    over the (tokens x width) activation in every layer, forward and backward). That kernel rounds the normalized y
    to y's dtype before the weight's product: under bf16 one more rounding than an fp32 product would make, the
    same function in float32.
    """

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))
        self.eps = eps

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return rms_norm(y, self.weight, self.eps, y.dtype)


class SSDMixer(nn.Module):
    """Mamba-2 mixer in MOHAWK's layout: per-head C (from Q), grouped B (from K), x (from V), a z gate and a decay.

    in_proj -> [z | x | B | C | decay]; a short causal depthwise conv over [x | B | C]; SSD scan; D skip;
    y * silu(z) (discrete form, as Phi-Mamba) or RMSNorm(y) * silu(z) (Mamba-2 form with `norm=True`); out_proj.
    Decay: discrete form a_t = exp(-softplus(decay_t + decay_bias)); Mamba-2 form dt_t = softplus(decay_t + dt_bias),
    a_t = exp(-dt_t * exp(A_log)), and the SSD input is scaled by dt_t.
    """

    def __init__(self, hidden_size: int, spec: MixerSpec, layer_idx: int):
        super().__init__()
        self.spec, self.layer_idx = spec, layer_idx
        h, p, n = spec.n_heads, spec.head_dim, spec.d_state
        self.x_width, self.b_width, self.c_width = h * p, spec.n_b_groups * n, spec.n_c_groups * n
        conv_width = self.x_width + self.b_width + self.c_width
        self.in_proj = AlignedLinear(hidden_size, self.x_width + conv_width + h, bias=True)
        self.conv_weight = nn.Parameter(torch.zeros(conv_width, spec.conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(conv_width))
        self.D = nn.Parameter(torch.zeros(h))
        if spec.form == "mamba2":
            self.dt_bias = nn.Parameter(torch.zeros(h))
            self.A_log = nn.Parameter(torch.zeros(h))
        else:
            self.decay_bias = nn.Parameter(torch.zeros(h))
        self.norm = RMSNorm(self.x_width) if spec.norm else None
        self.out_proj = nn.Linear(self.x_width, hidden_size, bias=spec.out_bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A fresh mixer: closed gate, identity conv, decays spread over the heads (Mamba-2's ranges).

        The gate starts closed (z = 0, silu(0) = 0): a freshly converted layer adds nothing to the residual stream,
        so the student starts as the teacher without those attention layers rather than with an unnormalised
        linear attention in their place (whose outputs are orders of magnitude too large before stage 1). Stage 1
        fits the mixing matrix, which does not involve the gate; stage 2 opens it (d silu/dz = 1/2 at 0).
        """
        h = self.spec.n_heads
        nn.init.normal_(self.in_proj.weight, std=0.02)
        nn.init.zeros_(self.in_proj.bias)
        self.in_proj.weight[: self.x_width].zero_()  # z rows: closed gate
        self.in_proj.weight[-h:].zero_()  # decay rows: the decay starts from its bias alone
        self.conv_weight.zero_()
        self.conv_weight[:, -1] = 1.0  # identity: the conv starts as a no-op, so transferred Q/K/V pass unchanged
        self.conv_bias.zero_()
        self.D.zero_()
        # Per-head time scales dt log-uniform in [1e-3, 1e-1] (Mamba-2's default range).
        dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), h))
        if self.spec.form == "mamba2":
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.A_log.zero_()  # A = -1, so log a = -dt
        else:
            self.decay_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # -softplus(bias) = -dt
        nn.init.normal_(self.out_proj.weight, std=0.02)
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)

    def _project(self, hidden_states: torch.Tensor):
        """in_proj, split into (z, xbc, raw decay).

        The split takes in_proj's padded output whole, its zero columns as a fourth part dropped: the backward of a
        split is one concatenation of the parts' gradients (the dropped part's zeros included) at the padded width,
        where slicing the pad off first cost a zero fill and a strided copy of the gradient at that width too (one
        (16, 2048, 1929) copy a layer, 2.6% of a stage-3 step's kernel time on the H200 profile of 2026-12-04).
        """
        widths = [self.x_width, self.x_width + self.b_width + self.c_width, self.spec.n_heads]
        pad = self.in_proj.pad_width(hidden_states)
        zxbcd = self.in_proj(hidden_states, keep_padding=True)
        return zxbcd.split(widths + [pad], dim=-1)[:3]

    def decay(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(log_a, scale) in float32 from the decay channels of in_proj."""
        raw = raw.float()
        if self.spec.form == "mamba2":
            dt = F.softplus(raw + self.dt_bias.float())
            return -dt * torch.exp(self.A_log.float()), dt
        return -F.softplus(raw + self.decay_bias.float()), None

    def ssd_inputs(
        self,
        hidden_states: torch.Tensor,
        conv_state: torch.Tensor | None = None,
        padding_mask: torch.Tensor | None = None,
    ):
        """Project, convolve and split: the SSD kernel's inputs, and the conv's final state (for a cache).

        padding_mask (b, L), 1 for tokens and 0 for padding: a padded position is made a no-op of the recurrence
        (zero conv input, x = 0 and decay 1), so left padding leaves the state as if the sequence started after it.
        """
        b, L, _ = hidden_states.shape
        spec = self.spec
        z, xbc, raw_decay = self._project(hidden_states)
        keep = None
        if padding_mask is not None:
            keep = padding_mask[:, -L:].to(xbc.dtype)[..., None]
            xbc = xbc * keep
        xbc, conv_state = causal_conv1d(xbc, self.conv_weight.to(xbc.dtype), self.conv_bias.to(xbc.dtype), conv_state)
        if spec.conv_activation == "silu":
            xbc = F.silu(xbc)
        x, B, C = xbc.split([self.x_width, self.b_width, self.c_width], dim=-1)
        log_a, scale = self.decay(raw_decay)
        if keep is not None:
            x = x * keep
            log_a = log_a * keep.float()
        inputs = SSDInputs(
            x=x.reshape(b, L, spec.n_heads, spec.head_dim),
            log_a=log_a,
            B=B.reshape(b, L, spec.n_b_groups, spec.d_state),
            C=C.reshape(b, L, spec.n_c_groups, spec.d_state),
            scale=scale,
            z=z,
        )
        return inputs, conv_state

    def mixing_matrix(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The mixer's (b, h, L, L) mixing matrix M on these inputs (y = M x + D x); MOHAWK stage 1 fits it."""
        inputs, _ = self.ssd_inputs(hidden_states)
        return ssd_matrix(inputs.log_a, inputs.B.float(), inputs.C.float(), inputs.scale)

    def forward(
        self, hidden_states: torch.Tensor, past_key_values=None, cache=None, **kwargs
    ) -> tuple[torch.Tensor, None]:
        # Called by the teacher family's decoder layer in place of its attention: attention-only keyword arguments
        # (position embeddings, masks) do not concern an SSD layer and are ignored. With a DistillCache, the layer
        # continues from its cached conv and SSM states and leaves the new ones there.
        past_key_values = cache if cache is not None else past_key_values
        slot = past_key_values.layers[self.layer_idx] if isinstance(past_key_values, DistillCache) else None
        if slot is None:
            inputs, _ = self.ssd_inputs(hidden_states)
            y, _ = self.scan(inputs)
            return self.output(y, inputs.z), None
        L = hidden_states.shape[1]
        if L == 1 and slot.ssm_state is not None:
            out = self.step(hidden_states, slot)
        else:
            # The mask's last L columns are this call's tokens: padding never enters the state, whichever chunk
            # of a prompt it falls in.
            padding = past_key_values.padding_mask
            inputs, slot.conv_state = self.ssd_inputs(hidden_states, slot.conv_state, padding)
            y, slot.ssm_state = self.scan(inputs, slot.ssm_state)
            out = self.output(y, inputs.z)
        slot.seen += L
        return out, None

    def step(self, hidden_states: torch.Tensor, slot: SSDLayerState) -> torch.Tensor:
        """One token (b, 1, H) through the conv and the SSD recurrence, updating `slot`'s states."""
        b = hidden_states.shape[0]
        spec = self.spec
        z, xbc, raw_decay = self._project(hidden_states[:, 0])
        xbc, slot.conv_state = causal_conv1d_step(
            slot.conv_state, xbc, self.conv_weight.to(xbc.dtype), self.conv_bias.to(xbc.dtype)
        )
        if spec.conv_activation == "silu":
            xbc = F.silu(xbc)
        x, B, C = xbc.split([self.x_width, self.b_width, self.c_width], dim=-1)
        log_a, scale = self.decay(raw_decay)
        with torch.autocast(hidden_states.device.type, enabled=False):
            y, slot.ssm_state = ssd_decode_step(
                slot.ssm_state,
                x.reshape(b, spec.n_heads, spec.head_dim).float(),
                log_a,
                B.reshape(b, spec.n_b_groups, spec.d_state).float(),
                C.reshape(b, spec.n_c_groups, spec.d_state).float(),
                scale,
                self.D.float(),
            )
        return self.output(y.to(x.dtype)[:, None], z[:, None])

    def scan(self, inputs: SSDInputs, initial_state: torch.Tensor | None = None):
        """The SSD scan, D skip included. The decays (log_a, scale) are always float32: bf16 cumulative decays lose
        the long-range terms. On CUDA, x, B and C keep their dtype (bf16 under bf16 autocast), which the Triton
        kernel multiplies on the tensor cores with float32 accumulation and float32 decays and state (float32
        operands would take ~6x longer in exact-float32 products); elsewhere they are float32. The returned state
        is float32 (a cache keeps it)."""
        dtype = inputs.x.dtype
        compute = dtype if inputs.x.is_cuda and dtype in (torch.bfloat16, torch.float16) else torch.float32
        with torch.autocast(inputs.x.device.type, enabled=False):
            y, state = ssd(
                inputs.x.to(compute),
                inputs.log_a,
                inputs.B.to(compute),
                inputs.C.to(compute),
                inputs.scale,
                self.D.float(),
                initial_state,
                self.spec.chunk_size,
            )
        return y.to(dtype), state.float()

    def output(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.reshape(*y.shape[:2], self.x_width)
        if self.norm is not None:
            y = self.norm(y)
        return self.out_proj(swiglu(z, y))  # y * silu(z)


class StaticKVSlot(DynamicLayer):
    """A kept attention layer's KV cache inside a captured decode step: fixed buffers (b, kv heads, capacity, d)
    written at the step's position (a device scalar shared by all such layers, advanced once a step by the graph
    itself), so that replaying the graph appends where the last replay stopped. Attention reads the whole buffer;
    the decoder's mask hides the positions not yet written."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor):
        super().__init__()
        self.keys, self.values, self.position = keys, values, position
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        index = self.position.view(1)  # one token a step
        self.keys.index_copy_(2, index, key_states)
        self.values.index_copy_(2, index, value_states)
        return self.keys, self.values


def grouped_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention of one new token a sequence against a grouped-query KV cache, without copying the cache once per
    query head: the query heads that share a KV head become that head's query rows (b, kv heads, group, d), and the
    mask, one row of key positions, holds for each of them. transformers' sdpa path repeats the keys and values to
    every query head when a mask is given (5.17 does; later versions pack the heads as here), which at a long cache
    reads and writes the cache several times a layer and step. Used inside GraphDecoder's step only.
    """
    b, heads, q, d = query.shape
    if q != 1:
        raise ValueError(f"grouped_decode_attention takes one query token a sequence, got {q}")
    rows = query.reshape(b, key.shape[1], heads // key.shape[1], d)
    out = F.scaled_dot_product_attention(rows, key, value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(b, heads, 1, value.shape[-1]).transpose(1, 2), None


AttentionInterface.register("distill_grouped_decode", grouped_decode_attention)


@contextlib.contextmanager
def attention_implementation(config, name: str):
    """`config`'s attention implementation set to `name` for the block (the attention layers read it each call)."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def graph_decodable(config) -> bool:
    """Whether a decode step of this student can be captured: its kept attention layers (if any) attend to every
    earlier position through an implementation that takes the decoder's additive mask (sdpa or eager)."""
    if not config.attention_layers:
        return True
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(layer_types[i] == "full_attention" for i in config.attention_layers if i < len(layer_types))


class GraphDecoder:
    """One decode step of a student captured as a CUDA graph, for one batch size.

    A step is ~30 layers of small kernels: on a host whose CPU is slow, launching them one by one costs tens of
    milliseconds, replaying the graph well under one. The graph reads the token and every SSD layer's conv and SSM
    state from static buffers and writes the new states back into them; a hybrid's attention layers append to
    static KV buffers of room for `capacity` tokens (StaticKVSlot) behind a mask the graph builds from the step's
    position. `step` binds a generation's DistillCache to those buffers (copying its states and keys in once) and
    replays; the cache's attention layers then hold views of the buffers, so an eager step can take over at any
    time. A generation that outgrows the capacity gets a new decoder, with more (the model's `_graph_step`).
    `capture=False` runs the same step uncaptured, on any device: how the static-buffer logic is tested on the CPU.
    """

    headroom = 256  # tokens of room beyond the prompt, rounded up to a multiple of this

    def __init__(self, model, cache: DistillCache, batch_size: int, capture: bool = True):
        self.model, self.batch_size, self.capture = model, batch_size, capture
        device = next(model.parameters()).device
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.cache = DistillCache(model.config)  # the graph's own slots, pointing at the static buffers
        self.buffers = []
        for idx in model.ssd_layers:
            slot, own = cache.layers[idx], self.cache.layers[idx]
            own.conv_state, own.ssm_state = slot.conv_state.clone(), slot.ssm_state.clone()
            self.buffers.append((idx, own.conv_state, own.ssm_state))
        self.attention = sorted(model.config.attention_layers or [])
        self.length = cache.get_seq_length()  # tokens in the cache, as a Python int
        self.capacity = -(-(self.length + self.headroom) // self.headroom) * self.headroom
        self.kv = []
        if self.attention:
            self.position = torch.zeros((), dtype=torch.long, device=device)
            self.position_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
            self.valid = torch.ones(batch_size, self.capacity, dtype=torch.bool, device=device)
            self.key_index = torch.arange(self.capacity, device=device)
            for idx in self.attention:
                keys, values = cache.layers[idx].keys, cache.layers[idx].values
                kbuf = keys.new_zeros(*keys.shape[:2], self.capacity, keys.shape[-1])
                vbuf = values.new_zeros(*values.shape[:2], self.capacity, values.shape[-1])
                self.cache.layers[idx] = StaticKVSlot(kbuf, vbuf, self.position)
                self.kv.append((idx, kbuf, vbuf))
        self.bound = None
        self.graph, self.logits = None, None

    def _body(self) -> torch.Tensor:
        body = self.model.model
        h = body.embed_tokens(self.tokens)
        extra = {}
        if self.kv:
            # The step sees every written position up to its own, except the prompt's padding.
            allowed = self.valid & (self.key_index <= self.position)
            mask = torch.zeros(allowed.shape, dtype=h.dtype, device=h.device)
            mask = mask.masked_fill(~allowed, torch.finfo(h.dtype).min)[:, None, None, :]
            extra = dict(attention_mask=mask, position_ids=self.position_ids,
                         position_embeddings=body.rotary_emb(h, position_ids=self.position_ids))
        grouped = attention_implementation(self.model.config, "distill_grouped_decode")
        with grouped if self.kv else contextlib.nullcontext():
            for layer in body.layers:
                out = layer(h, **{CACHE_ARG: self.cache}, **extra)
                h = out[0] if isinstance(out, tuple) else out
        norm = body.norm if hasattr(body, "norm") else body.final_layernorm
        logits = self.model.lm_head(norm(h))
        # Write the new states into the static buffers the next replay reads, and point the slots back at them.
        for idx, conv, ssm in self.buffers:
            own = self.cache.layers[idx]
            conv.copy_(own.conv_state)
            ssm.copy_(own.ssm_state)
            own.conv_state, own.ssm_state = conv, ssm
        if self.kv:
            self.position.add_(1)
        return logits

    def _capture(self) -> None:
        saved = [(conv.clone(), ssm.clone()) for _, conv, ssm in self.buffers]
        position = self.position.clone() if self.kv else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles the allocator; advances the states...
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        for (_, conv, ssm), (c, s) in zip(self.buffers, saved):  # ...so put them back (the KV rows written past
            conv.copy_(c)  # the position are masked, and overwritten by the steps that reach them)
            ssm.copy_(s)
        if self.kv:
            self.position.copy_(position)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the step without running it
            self.logits = self._body()

    def _is_bound(self, cache: DistillCache) -> bool:
        if self.bound is not cache or any(cache.layers[i].ssm_state is not ssm for i, _, ssm in self.buffers):
            return False
        for idx, kbuf, _ in self.kv:
            keys = cache.layers[idx].keys
            if keys is None or keys.data_ptr() != kbuf.data_ptr() or keys.shape[-2] != self.length:
                return False
        return True

    def bind(self, cache: DistillCache) -> None:
        """Make `cache` the generation this graph continues: copy its states and keys in (once) and share the
        buffers."""
        for idx, conv, ssm in self.buffers:
            slot = cache.layers[idx]
            if slot.ssm_state is not ssm:
                conv.copy_(slot.conv_state)
                ssm.copy_(slot.ssm_state)
                slot.conv_state, slot.ssm_state = conv, ssm
        if self.kv:
            self.length = cache.get_seq_length()
            self.position.fill_(self.length)
            self.valid.fill_(True)
            if cache.padding_mask is not None:  # the generation's 2-D mask; left padding stays hidden
                self.valid[:, : self.length] = cache.padding_mask[:, : self.length].bool()
            for idx, kbuf, vbuf in self.kv:
                slot = cache.layers[idx]
                if slot.keys.data_ptr() != kbuf.data_ptr():
                    kbuf[:, :, : self.length].copy_(slot.keys)
                    vbuf[:, :, : self.length].copy_(slot.values)
                slot.keys, slot.values = kbuf[:, :, : self.length], vbuf[:, :, : self.length]
        self.bound = cache

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: DistillCache, position_ids: torch.Tensor | None = None):
        if not self._is_bound(cache):
            self.bind(cache)
        self.tokens.copy_(input_ids)
        if self.kv:
            # What the eager forward would use: generate's position_ids, else the cache's length.
            self.position_ids.copy_(position_ids if position_ids is not None else self.position.expand(1, 1))
        if not self.capture:
            self.logits = self._body()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        for idx, _, _ in self.buffers:
            cache.layers[idx].seen += 1
        self.length += 1
        for idx, kbuf, vbuf in self.kv:
            cache.layers[idx].keys, cache.layers[idx].values = kbuf[:, :, : self.length], vbuf[:, :, : self.length]
        return self.logits


class StudentMixin:
    """Swaps the attention of every layer outside `config.attention_layers` for an SSDMixer."""

    def __init__(self, config):
        super().__init__(config)
        spec = MixerSpec(**config.ssd_mixer)
        keep = set(config.attention_layers or [])
        for idx, layer in enumerate(self.model.layers):
            if idx not in keep:
                layer.self_attn = SSDMixer(config.hidden_size, spec, idx)
        use_block_kernels(self)
        self._graph_decoders: dict[int, GraphDecoder] | None = None
        self._graph_decode_capture = True  # False: the decoders' step runs uncaptured, on any device (tests)
        # A longer prompt is prefilled through the cache this many tokens at a time (None: in one pass), so that
        # prefill memory stays that of one chunk however long the prompt is; the logits are the one pass's.
        self.prefill_chunk_size: int | None = 2048

    def enable_cuda_graph_decode(self, enabled: bool = True):
        """Decode one-token steps of generate() by replaying a CUDA graph (on CUDA, no grad).

        Worth it where the host's Python is the bottleneck (small batches, slow CPUs). Graphs are captured per batch
        size on first use, and again when a hybrid's generation outgrows the room its KV buffers were made with;
        the prefill runs eagerly, and so does a hybrid whose attention is neither sdpa nor eager or slides.
        Returns the model.
        """
        self._graph_decoders = {} if enabled else None
        return self

    def _graph_step(self, input_ids, cache, position_ids=None):
        """The logits (b, 1, V) of one graph-replayed step, or None where this step must run eagerly."""
        if (
            self._graph_decoders is None
            or not graph_decodable(self.config)
            or input_ids is None
            or input_ids.shape[1] != 1
            or (self._graph_decode_capture and not input_ids.is_cuda)
            or torch.is_grad_enabled()
            or not isinstance(cache, DistillCache)
            or cache.get_seq_length() == 0
        ):
            return None
        b = input_ids.shape[0]
        decoder = self._graph_decoders.get(b)
        if decoder is None or (decoder.kv and cache.get_seq_length() >= decoder.capacity):
            # The first, or one with more room for a hybrid's keys.
            decoder = self._graph_decoders[b] = GraphDecoder(self, cache, b, capture=self._graph_decode_capture)
        return decoder.step(input_ids, cache, position_ids)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not hand the model a DynamicCache: forward builds a DistillCache, with SSD state slots.
        return False

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        use_cache=None,
        logits_to_keep=0,
        cache=None,
        **kwargs,
    ):
        # `logits_to_keep` is named so that generate() finds it in the signature and asks for the last position's
        # logits only: a prefill of 64 x 8192 tokens would otherwise build 26 GB of logits.
        past_key_values = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DistillCache(self.config)
        if isinstance(past_key_values, DistillCache):
            is_2d = attention_mask is not None and attention_mask.dim() == 2
            past_key_values.padding_mask = attention_mask if is_2d else None
            logits = self._graph_step(input_ids, past_key_values, kwargs.get("position_ids"))
            if logits is not None:
                return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: past_key_values})
            chunk = self.prefill_chunk_size
            if chunk and input_ids is not None and input_ids.shape[1] > chunk and isinstance(logits_to_keep, int):
                return self._prefill_in_chunks(
                    input_ids, attention_mask, past_key_values, use_cache, logits_to_keep, chunk, kwargs
                )
        if not self.config.attention_layers:
            # No layer attends. From a 2-D mask (or behind a cache) transformers would still build a (batch, 1,
            # queries, keys) mask, 4.3 GB for a 2048-token prefill chunk at 64 x 32K; a 4-D mask is taken as given,
            # and no SSD layer reads it (padding reaches them through the cache's padding_mask, set above).
            device = (input_ids if input_ids is not None else kwargs["inputs_embeds"]).device
            attention_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            **{CACHE_ARG: past_key_values},
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    def _prefill_in_chunks(self, input_ids, attention_mask, cache, use_cache, logits_to_keep, chunk, kwargs):
        """input_ids through `cache` `chunk` tokens at a time: each SSD layer carries its conv and SSM state from
        chunk to chunk, a kept attention layer its KV cache. Logits as one pass would give them (earlier chunks'
        only where all positions were asked for, logits_to_keep=0)."""
        L = input_ids.shape[1]
        logits, out = [], None
        for start in range(0, L, chunk):
            end = min(start + chunk, L)
            part = dict(kwargs)
            for key in ("position_ids", "cache_position"):
                if part.get(key) is not None:
                    part[key] = part[key][..., start:end]
            mask = attention_mask
            if mask is not None and mask.dim() == 2:  # covers the cached tokens and all of input_ids
                mask = mask[:, : mask.shape[1] - (L - end)]
            keep = logits_to_keep if end == L or logits_to_keep == 0 else 1
            out = self(
                input_ids=input_ids[:, start:end], attention_mask=mask, past_key_values=cache, use_cache=use_cache,
                logits_to_keep=keep, **part,
            )
            if logits_to_keep == 0:
                logits.append(out.logits)
        if logits_to_keep == 0:
            out.logits = torch.cat(logits, dim=1)
        return out

    @property
    def ssd_layers(self) -> list[int]:
        keep = set(self.config.attention_layers or [])
        return [i for i in range(self.config.num_hidden_layers) if i not in keep]

    def mixer(self, idx: int) -> SSDMixer:
        return self.model.layers[idx].self_attn

    def mixing_matrices(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each SSD layer's mixing matrix (b, h, L, L) on the student's own forward of `input_ids`."""
        matrices: dict[int, torch.Tensor] = {}
        hooks = [
            self.model.layers[i].self_attn.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: matrices.__setitem__(i, m.mixing_matrix(kwargs["hidden_states"])),
                with_kwargs=True,
            )
            for i in self.ssd_layers
        ]
        try:
            self(input_ids)
        finally:
            for hook in hooks:
                hook.remove()
        return matrices


class DistillLlamaForCausalLM(StudentMixin, LlamaForCausalLM):
    config_class = DistillLlamaConfig


class DistillQwen2ForCausalLM(StudentMixin, Qwen2ForCausalLM):
    config_class = DistillQwen2Config


class DistillPhiForCausalLM(StudentMixin, PhiForCausalLM):
    config_class = DistillPhiConfig


STUDENT_CLASSES = {
    "llama": DistillLlamaForCausalLM,
    "qwen2": DistillQwen2ForCausalLM,
    "phi": DistillPhiForCausalLM,
}
