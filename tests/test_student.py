"""Students built from teachers: weight transfer, hybrids, the mixing matrix, save/load."""

import pytest
import torch

from distill.config import StudentConfig
from distill.models.transfer import build_student


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def random_ids(b=2, L=33):
    return torch.randint(0, 257, (b, L), generator=torch.Generator().manual_seed(torch.seed() % 2**31))


@pytest.mark.parametrize("form", ["discrete", "mamba2"])
def test_mixing_matrix_is_the_mixer(tiny_teacher, form):
    """y = M x + D x: the matrix the stage-1 loss fits is exactly what the forward computes."""
    student = build_student(tiny_teacher, StudentConfig(form=form), attention_layers=[])
    mixer = student.mixer(0)
    with torch.no_grad():
        mixer.D.normal_()
        mixer.conv_weight.normal_(std=0.5)  # a non-identity conv, so the matrix must see the conv too
    hidden = torch.randn(2, 29, student.config.hidden_size)
    inputs, _ = mixer.ssd_inputs(hidden)
    y, _ = mixer.scan(inputs)
    M = mixer.mixing_matrix(hidden)
    expected = torch.einsum("bhij,bjhp->bihp", M, inputs.x) + mixer.D[:, None] * inputs.x
    assert rel(y, expected) < 1e-5


def test_transfer_maps_qkvo(tiny_teacher):
    """At transfer, C = Q * softmax_scale and B = K (GQA groups) on the same input: M = (q.k) * scale * decay."""
    student = build_student(tiny_teacher, StudentConfig(form="discrete"), attention_layers=[])
    layer = 2
    attn = tiny_teacher.model.model.layers[layer].self_attn
    mixer = student.mixer(layer)
    hidden = torch.randn(1, 20, student.config.hidden_size)
    cfg = tiny_teacher.config
    h, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // h
    with torch.no_grad():
        q = attn.q_proj(hidden).view(1, 20, h, d)
        k = attn.k_proj(hidden).view(1, 20, hk, d)
        v = attn.v_proj(hidden).view(1, 20, hk, d)
        inputs, _ = mixer.ssd_inputs(hidden)
    assert rel(inputs.C, q * attn.scaling) < 1e-6
    assert rel(inputs.B, k) < 1e-6
    assert rel(inputs.x, v.repeat_interleave(h // hk, dim=2)) < 1e-6  # V repeated over each KV group's heads
    o = getattr(attn, tiny_teacher.family.o_proj)
    assert torch.equal(mixer.out_proj.weight, o.weight)
    # The gate starts closed: a converted layer adds nothing until stage 2 opens it.
    assert torch.equal(inputs.z, torch.zeros_like(inputs.z))
    bias = mixer.out_proj.bias if mixer.out_proj.bias is not None else 0.0
    with torch.no_grad():
        assert torch.equal(mixer(hidden)[0], torch.zeros_like(hidden) + bias)


def test_everything_else_is_copied(tiny_teacher):
    student = build_student(tiny_teacher, StudentConfig(), attention_layers=[1])
    teacher_state = tiny_teacher.model.state_dict()
    copied = 0
    for name, tensor in student.state_dict().items():
        if ".self_attn." in name and not name.startswith("model.layers.1."):
            continue
        assert torch.equal(tensor, teacher_state[name]), name
        copied += 1
    assert copied > 10


def test_hybrid_keeps_attention_layers(tiny_llama):
    """A kept layer is the teacher's own: on the teacher's block input it gives the teacher's block output."""
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[1, 3])
    assert student.ssd_layers == [0, 2]
    ids = random_ids()
    captured = tiny_llama.capture(ids, [1])
    record = captured.layers[1]
    position_ids = torch.arange(ids.shape[1])[None]
    pe = student.model.rotary_emb(record.block_input, position_ids)
    with torch.no_grad():
        out = student.model.layers[1](record.block_input, position_embeddings=pe, attention_mask=None)
    assert rel(out, record.block_output) < 1e-5


def test_save_and_reload_gives_same_logits(tiny_teacher, tmp_path):
    student = build_student(tiny_teacher, StudentConfig(form="mamba2"), attention_layers=[1])
    student.save_pretrained(tmp_path)
    again = type(student).from_pretrained(tmp_path)
    assert again.config.attention_layers == [1] and again.ssd_layers == [0, 2, 3]
    ids = random_ids()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, again(ids).logits)


def test_chunk_size_does_not_change_logits(tiny_llama):
    """The chunk size is an implementation detail: the whole student forward does not depend on it."""
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[])
    ids = random_ids(L=70)  # longer than one chunk of 64
    with torch.no_grad():
        chunked = student(ids).logits
        for i in student.ssd_layers:
            student.mixer(i).spec.chunk_size = 16
        rechunked = student(ids).logits
    assert rel(rechunked, chunked) < 1e-5


def test_mixing_matrices_of_all_layers(tiny_llama):
    student = build_student(tiny_llama, StudentConfig(), attention_layers=[0])
    ids = random_ids(L=12)
    with torch.no_grad():
        matrices = student.mixing_matrices(ids)
    assert sorted(matrices) == [1, 2, 3]
    M = matrices[1]
    assert M.shape == (2, 4, 12, 12)
    assert torch.all(M.triu(1) == 0)  # causal
    assert M.abs().sum() > 0
