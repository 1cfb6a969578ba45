"""`auto` precision follows the device: bf16 where it is native (GPU, AMX / AVX512-BF16 CPU), fp32 where it is
emulated (AVX2-only CPU); explicit settings win; a resumed run keeps what it started with."""

import pytest
import torch
from omegaconf import OmegaConf

from distill import precision
from distill.trainer import Trainer

CPU = torch.device("cpu")


def cpu_with(monkeypatch, amx=False, avx512_bf16=False, avx512=False, avx2=True):
    for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16),
                        ("_is_avx512_supported", avx512), ("_is_avx2_supported", avx2)):
        monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)


@pytest.mark.parametrize("caps, native", [
    (dict(amx=True, avx512_bf16=True, avx512=True), True),  # Sapphire Rapids and later
    (dict(avx512_bf16=True, avx512=True), True),  # Cooper Lake, Zen 4
    (dict(avx512=True), False),  # AVX512 without its bf16 instructions
    (dict(), False),  # AVX2 only (the 2-core AMD EPYC of issue 19)
])
def test_auto_follows_the_cpu(monkeypatch, caps, native):
    cpu_with(monkeypatch, **caps)
    r = precision.resolve("auto", "auto", CPU)
    assert (r.precision, r.teacher_dtype) == (("bf16", "bfloat16") if native else ("fp32", "float32"))
    assert ("emulated" in r.why) != native and r.why
    assert precision.auto_teacher_dtype(CPU) == r.teacher_dtype


def test_explicit_settings_win(monkeypatch):
    cpu_with(monkeypatch)  # no native bf16: auto would pick fp32
    assert precision.resolve("bf16", "bfloat16", CPU) == precision.Resolved("bf16", "bfloat16", "")
    r = precision.resolve("bf16", "auto", CPU)
    assert (r.precision, r.teacher_dtype) == ("bf16", "float32")
    cpu_with(monkeypatch, amx=True)
    r = precision.resolve("auto", "float32", CPU)
    assert (r.precision, r.teacher_dtype) == ("bf16", "float32")


def test_auto_on_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    r = precision.resolve("auto", "auto", torch.device("cuda"))
    assert (r.precision, r.teacher_dtype) == ("bf16", "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve("auto", "auto", torch.device("cuda")).precision == "fp32"


def test_trainer_logs_and_records_the_choice_and_a_resume_keeps_it(monkeypatch, tiny_cfg, capsys):
    cpu_with(monkeypatch)  # AVX2 only
    cfg = tiny_cfg("teacher.dtype=auto", "trainer.device=cpu")
    assert (cfg.trainer.precision, cfg.teacher.dtype) == ("auto", "auto")  # the defaults a user gets
    trainer = Trainer(cfg)
    out = capsys.readouterr().out
    assert "trainer.precision=fp32 and teacher.dtype=float32" in out and "emulated" in out
    assert next(trainer.teacher.model.parameters()).dtype == torch.float32
    saved = OmegaConf.load(trainer.run_dir / "config.yaml")
    assert (saved.trainer.precision, saved.teacher.dtype) == ("fp32", "float32")

    # The same folder resumed with `auto` on a CPU with native bf16 keeps fp32: a run computes one thing.
    cpu_with(monkeypatch, amx=True, avx512_bf16=True)
    again = Trainer(tiny_cfg("teacher.dtype=auto", "trainer.device=cpu"))
    assert (again.cfg.trainer.precision, again.cfg.teacher.dtype) == ("fp32", "float32")
    assert "as " in capsys.readouterr().out
    # A new folder on that CPU gets bf16.
    fresh = tiny_cfg("teacher.dtype=auto", "trainer.device=cpu", f"run_dir={trainer.run_dir}_other")
    other = Trainer(fresh)
    assert (other.cfg.trainer.precision, other.cfg.teacher.dtype) == ("bf16", "bfloat16")
    assert next(other.teacher.model.parameters()).dtype == torch.bfloat16
