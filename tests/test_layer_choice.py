"""`distill rank` (which layers to keep as attention, measured end to end) and `student.init_from` (a hybrid started
from another run's trained SSD layers)."""

import json

import pytest
import torch

from distill.cli import main
from distill.config import ConfigError, StudentConfig
from distill.layer_choice import HeldOut, choose_layers, held_out, hybrid_view, measure, token_kl
from distill.models.teachers import load_teacher
from distill.models.transfer import adopt_trained_layers, build_student
from distill.recall import true_token_logprobs, window_mask
from distill.run_folder import load_run
from tests.conftest import teacher_config


def fresh_seed() -> int:
    return torch.seed() % 2**31


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def pure_run(tmp_path_factory):
    """A pure SSD student of the tiny Llama after one stage-2 step."""
    run_dir = tmp_path_factory.mktemp("rank") / "pure"
    assert main(["train", "experiment=tiny", "student.attention_layers=[]", "pipeline=[stage2]",
                 "stages.stage2.tokens=256", "trainer.precision=fp32", f"run_dir={run_dir}"]) == 0
    return run_dir


def perturbed(student, seed: int):
    """Move the SSD weights off their transferred values, so a test tells trained layers from transferred ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in student.ssd_layers:
            for p in student.mixer(i).parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


def test_hybrid_view_is_the_built_hybrid(tiny_llama):
    pure = perturbed(build_student(tiny_llama, StudentConfig(), []), fresh_seed())
    hybrid = build_student(tiny_llama, StudentConfig(), [1, 3])
    taken, left = adopt_trained_layers(hybrid, pure.state_dict())
    assert (taken, left) == ([0, 2], [])
    ids = torch.randint(0, 257, (2, 48), generator=torch.Generator().manual_seed(fresh_seed()))
    with torch.no_grad():
        before = pure(ids, use_cache=False).logits
        with hybrid_view(pure, tiny_llama, [1, 3]) as view:
            viewed = view(ids, use_cache=False).logits
        after = pure(ids, use_cache=False).logits
        built = hybrid(ids, use_cache=False).logits
    assert rel(viewed, built) < 1e-5
    assert torch.equal(before, after) and pure.config.attention_layers == []  # put back
    assert rel(viewed, before) > 1e-3  # and the view did change something


def test_window_mask_is_a_shorter_context():
    """With every attention limited to the last W tokens, a one-layer RoPE model's output at position t is its
    output on the W tokens ending at t alone (attention scores depend only on relative positions)."""
    cfg = teacher_config("tiny-llama")
    cfg.architecture = {**cfg.architecture, "num_hidden_layers": 1}
    teacher = load_teacher(cfg)
    L, W = 40, 7
    ids = torch.randint(0, 257, (1, L), generator=torch.Generator().manual_seed(fresh_seed()))
    with torch.no_grad():
        windowed = teacher.model.model(input_ids=ids, attention_mask=window_mask(L, W, 0, "cpu"),
                                       use_cache=False).last_hidden_state
        for t in (W - 1, 20, L - 1):
            alone = teacher.model.model(input_ids=ids[:, t - W + 1 : t + 1], use_cache=False).last_hidden_state
            assert rel(windowed[0, t], alone[0, -1]) < 1e-5
    mask = window_mask(10, 3, 2, "cpu")[0, 0]
    assert mask[9].tolist() == [True, True] + [False] * 5 + [True] * 3


def test_token_kl_and_logprobs_against_float64():
    g = torch.Generator().manual_seed(fresh_seed())
    n, H, V = 37, 16, 50
    s_head, t_head = torch.nn.Linear(H, V), torch.nn.Linear(H, V, bias=False)
    s, t = torch.randn(n, H, generator=g), torch.randn(n, H, generator=g)
    targets = torch.randint(0, V, (n,), generator=g)
    log_s = torch.log_softmax(s.double() @ s_head.weight.double().t() + s_head.bias.double(), -1)
    log_t = torch.log_softmax(t.double() @ t_head.weight.double().t(), -1)
    expected = (log_t.exp() * (log_t - log_s)).sum(-1)
    with torch.no_grad():
        assert rel(token_kl(s, s_head, t, t_head, chunk=8), expected) < 1e-5
        assert rel(true_token_logprobs(s, s_head, targets, chunk=5), log_s.gather(-1, targets[:, None])[:, 0]) < 1e-5


def test_greedy_choice_and_its_measures(pure_run):
    run = load_run(pure_run)
    ids = [torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(fresh_seed()))]
    data = held_out(run.teacher, ids, "fp32", window=4, sink=1, margin=0.01)
    assert 0 < data.recall_fraction < 1
    student, teacher = run.student, run.teacher
    assert measure(student, teacher, student.ssd_layers, data, "fp32").kl < 1e-6  # every layer kept: the teacher
    ranking = choose_layers(student, teacher, data, keep=2, recall_weight=1.0, precision="fp32", log=lambda *_: None)
    base = ranking.base
    assert base.kl > 1e-4 and base.recall_kl > 0
    scores = {i: f.score(base, 1.0) for i, f in ranking.keep_only.items()}
    first, second = ranking.path[0][0], ranking.path[1][0]
    assert first == min(scores, key=scores.get)
    again = measure(student, teacher, [first, second], data, "fp32")
    assert abs(again.kl - ranking.path[1][1].kl) < 1e-6 * max(1.0, again.kl)
    for other in set(student.ssd_layers) - {first, second}:  # the second pick is the best given the first
        assert measure(student, teacher, [first, other], data, "fp32").score(base, 1.0) >= again.score(base, 1.0)
    # Without recall positions the recall term drops out of the score.
    none = HeldOut(data.ids, data.teacher_hidden, [torch.zeros_like(r) for r in data.recall])
    fit = measure(student, teacher, [first], none, "fp32")
    assert fit.recall_kl != fit.recall_kl and fit.score(measure(student, teacher, [], none, "fp32"), 1.0) < 1.0


def test_rank_command(pure_run, tmp_path, capsys):
    out = tmp_path / "rank"
    assert main(["rank", f"checkpoint={pure_run}", "keep=2", "batches=1", "recall_margin=0.01",
                 "recall_window=8", "device=cpu", f"out={out}"]) == 0
    record = json.loads((out / "ranking.json").read_text())
    assert len(record["path"]) == 2 and set(record["keep_only"]) == {"0", "1", "2", "3"}
    assert (out / "layer_choice.png").stat().st_size > 0
    chosen = sorted(p["layer"] for p in record["path"])
    assert f"student.attention_layers=[{','.join(map(str, chosen))}]" in (out / "summary.md").read_text()
    assert main(["rank", f"checkpoint={pure_run}", "keep=0"]) == 2
    assert "keep=0 must be at least 1" in capsys.readouterr().err


def test_init_from_takes_the_trained_ssd_layers(pure_run, tmp_path, capsys):
    source = load_run(pure_run).student.state_dict()
    run_dir = tmp_path / "hybrid"
    assert main(["train", "experiment=tiny", "student.attention_layers=[2]", f"student.init_from={pure_run}",
                 "pipeline=[stage3]", "stages.stage3.tokens=256", "stages.stage3.lr=0", f"run_dir={run_dir}"]) == 0
    assert "student.init_from: SSD layers [0, 1, 3]" in capsys.readouterr().out
    hybrid = load_run(run_dir)  # lr 0: the weights are what init_from left
    state, teacher = hybrid.student.state_dict(), hybrid.teacher.model.state_dict()
    for key, value in state.items():
        if key.startswith("model.layers.2."):
            assert torch.equal(value, teacher[key].float())  # the kept layer: the teacher's block
        elif key.startswith("model.layers."):
            assert torch.equal(value, source[key])
    with pytest.raises(ConfigError, match="fits no SSD layer"):
        adopt_trained_layers(build_student(hybrid.teacher, StudentConfig(form="mamba2"), []), source)
    assert main(["train", "experiment=tiny", f"student.init_from={tmp_path / 'nothing'}", "pipeline=[stage3]",
                 f"run_dir={tmp_path / 'bad'}"]) == 2
    assert "neither a run folder with a checkpoint" in capsys.readouterr().err
