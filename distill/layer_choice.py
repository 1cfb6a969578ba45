"""`distill rank`: which layers a hybrid should keep as attention, measured by what the student loses without them.

`distill inspect` ranks layers by how badly the SSD fits each one's attention matrix or block (stages 1-2). That
picks layers whose matrices are hard to fit, not those whose loss hurts the model most: on SmolLM2 the fit ranking
chose [0, 2, 11], which kept no in-context recall (LAMBADA 12.0 against the teacher's 29.2), while one late layer
alone carries most of the teacher's recall. Here each choice is measured end to end, on held-out text, on the student
of a run folder (typically a pure SSD student after stages 1-2, whose layers were each trained independently, so any
hybrid of its layers and the teacher's is a valid starting point for stage 3):

- held-out KL: KL(teacher || student) of the next-token distributions, mean over all held-out positions;
- recall KL: the same, over the positions where the teacher itself needs far context: its log-probability of the
  true next token drops by more than `recall_margin` nats when every attention layer of the teacher is restricted
  to the last `recall_window` tokens (plus the first `recall_sink`). These are the copies of names and facts from
  far back that LAMBADA measures, found in the training text's held-out tail rather than in a benchmark.

A hybrid is evaluated by swapping the teacher's decoder block in for the student's at each kept layer
(`hybrid_view`; no model is rebuilt). The choice grows greedily from the run's student: at each step the layer whose
return to attention lowers `KL / KL_0 + recall_weight * recall / recall_0` the most (relative to the run's student:
the two terms pull toward different layers, and the weight says how to trade them). Beside the path, every layer is
also measured alone, kept (the gain over the run's student) and converted (the loss against the teacher).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .kernels.reference import token_divergence
from .recall import recall_positions
from .stages.common import autocast
from .stages.divergence import head_logits


@dataclass
class Fit:
    """What a student (or hybrid of it) loses against the teacher on the held-out batches."""

    kl: float  # mean KL(teacher || student) over all positions, nats per token
    recall_kl: float  # the same over the recall positions (nan where there are none)

    def score(self, base: Fit, recall_weight: float) -> float:
        """Relative to `base`: 2 for the base itself (weight 1), 0 for the teacher."""
        recall = self.recall_kl / base.recall_kl if base.recall_kl > 0 else 0.0
        return self.kl / base.kl + recall_weight * recall


@dataclass
class HeldOut:
    """Held-out batches with what the teacher makes of them, computed once."""

    ids: list[torch.Tensor]  # (b, L) token ids
    teacher_hidden: list[torch.Tensor]  # (b, L, H): the teacher's final (normed) hidden states
    recall: list[torch.Tensor]  # (b, L - 1) bool: positions whose next token needs far context

    @property
    def recall_fraction(self) -> float:
        n = sum(r.numel() for r in self.recall)
        return sum(int(r.sum()) for r in self.recall) / max(1, n)


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _logits(hidden: torch.Tensor, head: torch.nn.Linear) -> torch.Tensor:
    return head_logits(hidden, head.weight, head.bias, torch.float32)


def token_kl(student_hidden, student_head, teacher_hidden, teacher_head, chunk: int = 4096) -> torch.Tensor:
    """KL(teacher || student) per position (n,), float32, from both models' final hidden states (n, H)."""
    out = torch.empty(student_hidden.shape[0], device=student_hidden.device)
    for s in _chunks(student_hidden.shape[0], chunk):
        log_t = torch.log_softmax(_logits(teacher_hidden[s], teacher_head), -1)
        log_s = torch.log_softmax(_logits(student_hidden[s], student_head), -1)
        out[s] = token_divergence(log_s, log_t, "forward_kl")
    return out


@torch.no_grad()
def held_out(teacher, batches: list[torch.Tensor], precision: str, window: int, sink: int, margin: float) -> HeldOut:
    """The teacher's final hidden states on `batches`, and the recall positions (see the module's docstring)."""
    hidden, recall = [], []
    for ids in batches:
        with autocast(ids.device, precision):
            full = teacher.model.model(input_ids=ids, use_cache=False).last_hidden_state
            positions = recall_positions(teacher, ids, full, window, sink, margin)
        hidden.append(full)
        recall.append(positions)
    return HeldOut(list(batches), hidden, recall)


@contextlib.contextmanager
def hybrid_view(student, teacher, keep: list[int]):
    """`student` with the teacher's decoder blocks (attention, MLP and norms, shared, frozen) at the SSD layers in
    `keep`: the hybrid that keeps them as attention, for evaluation. Everything is put back on exit."""
    layers = student.model.layers
    swap = [i for i in keep if i in set(student.ssd_layers)]
    own = {i: layers[i] for i in swap}
    before = student.config.attention_layers
    try:
        for i in swap:
            layers[i] = teacher.model.model.layers[i]
        # A student with attention layers builds the causal mask they read (a pure one hands them a placeholder).
        student.config.attention_layers = sorted(set(before or []) | set(swap))
        yield student
    finally:
        for i, layer in own.items():
            layers[i] = layer
        student.config.attention_layers = before


@torch.no_grad()
def measure(student, teacher, keep: list[int], data: HeldOut, precision: str) -> Fit:
    """The held-out and recall KL of the hybrid keeping `keep` as attention."""
    kl_sum, kl_n, recall_sum, recall_n = 0.0, 0, 0.0, 0
    with hybrid_view(student, teacher, keep):
        for ids, t_hidden, recall in zip(data.ids, data.teacher_hidden, data.recall):
            with autocast(ids.device, precision):
                s_hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
            kl = token_kl(s_hidden[:, :-1].flatten(0, 1), student.lm_head, t_hidden[:, :-1].flatten(0, 1),
                          teacher.lm_head)
            mask = recall.flatten()
            kl_sum, kl_n = kl_sum + kl.sum().item(), kl_n + kl.numel()
            recall_sum, recall_n = recall_sum + kl[mask].sum().item(), recall_n + int(mask.sum())
    return Fit(kl_sum / kl_n, recall_sum / recall_n if recall_n else float("nan"))


@dataclass
class Ranking:
    base: Fit  # the run's student
    candidates: list[int]  # its SSD layers
    keep_only: dict[int, Fit]  # each layer alone returned to attention
    convert_only: dict[int, Fit]  # each layer alone converted (every other candidate kept as attention)
    path: list[tuple[int, Fit]]  # the greedy choice: the layer added at each step and the hybrid's fit
    recall_weight: float

    def chosen(self, k: int) -> list[int]:
        return sorted(layer for layer, _ in self.path[:k])


def choose_layers(student, teacher, data: HeldOut, keep: int, recall_weight: float, precision: str,
                  log=print) -> Ranking:
    """Measure every layer alone (kept, converted), then grow the kept set greedily up to `keep` layers."""
    candidates = list(student.ssd_layers)
    base = measure(student, teacher, [], data, precision)
    log(f"run's student: held-out KL {base.kl:.4f}, recall KL {base.recall_kl:.4f}")
    keep_only = {i: measure(student, teacher, [i], data, precision) for i in candidates}
    convert_only = {i: measure(student, teacher, [j for j in candidates if j != i], data, precision)
                    for i in candidates}
    path: list[tuple[int, Fit]] = []
    chosen: list[int] = []
    for step in range(min(keep, len(candidates) - 1)):  # keeping every layer would be the teacher
        fits = keep_only if step == 0 else {
            i: measure(student, teacher, chosen + [i], data, precision) for i in candidates if i not in chosen
        }
        best = min(fits, key=lambda i: fits[i].score(base, recall_weight))
        chosen.append(best)
        path.append((best, fits[best]))
        log(f"keep {sorted(chosen)}: held-out KL {fits[best].kl:.4f}, recall KL {fits[best].recall_kl:.4f}")
    return Ranking(base, candidates, keep_only, convert_only, path, recall_weight)


def _pct(value: float, base: float) -> str:
    return f"{100 * value / base:.1f}%" if base > 0 else "n/a"


def summary(run_dir, ranking: Ranking, data: HeldOut, seconds: float, device: str) -> str:
    r, b = ranking, ranking.base
    ids = data.ids[0]
    lines = [
        f"# {run_dir}: which layers to keep as attention",
        "",
        f"Measured on {len(data.ids)} held-out batch(es) of {ids.shape[0]} x {ids.shape[1]} tokens; recall positions "
        f"(the teacher loses more than the margin without far context): {100 * data.recall_fraction:.2f}% of all. "
        f"Took {seconds:.1f} s on {device}. Score = KL / KL_0 + {r.recall_weight:g} x recall KL / recall KL_0, "
        f"relative to the run's student (KL_0 = {b.kl:.4f}, recall KL_0 = {b.recall_kl:.4f} nats per token).",
        "",
        "## The choice, one layer at a time",
        "",
        "| kept | layer added | attention layers | held-out KL | recall KL | score |",
        "|---|---|---|---|---|---|",
        f"| 0 | | [] | {b.kl:.4f} | {b.recall_kl:.4f} | {b.score(b, r.recall_weight):.3f} |",
    ]
    for k, (layer, fit) in enumerate(r.path, 1):
        lines.append(f"| {k} | {layer} | {r.chosen(k)} | {fit.kl:.4f} ({_pct(fit.kl, b.kl)}) | "
                     f"{fit.recall_kl:.4f} ({_pct(fit.recall_kl, b.recall_kl)}) | {fit.score(b, r.recall_weight):.3f} |")
    lines += [
        "",
        "## Each layer alone",
        "",
        "Kept: only this layer returned to attention (its held-out and recall KL as a share of the run's student's). "
        "Converted: only this layer an SSD, every other one attention (what converting it alone costs).",
        "",
        "| layer | kept: held-out KL | kept: recall KL | converted: held-out KL | converted: recall KL |",
        "|---|---|---|---|---|",
    ]
    for i in sorted(r.candidates, key=lambda i: r.keep_only[i].score(b, r.recall_weight)):
        k, c = r.keep_only[i], r.convert_only[i]
        lines.append(f"| {i} | {k.kl:.4f} ({_pct(k.kl, b.kl)}) | {k.recall_kl:.4f} ({_pct(k.recall_kl, b.recall_kl)}) "
                     f"| {c.kl:.4f} | {c.recall_kl:.4f} |")
    lines += ["", "Hybrids to train (stage 3 from this run's SSD layers: `student.init_from=RUN pipeline=[stage3]`):", ""]
    for k in sorted({1, 2, 3, 6, len(r.path)} & set(range(1, len(r.path) + 1))):
        lines.append(f"- {k} attention layer(s): `student.attention_layers=[{','.join(map(str, r.chosen(k)))}]`")
    lines += ["", "![layer choice](layer_choice.png)", ""]
    return "\n".join(lines)


def plot(ranking: Ranking, path: Path) -> None:
    from .inspect import pyplot

    plt = pyplot()
    r, b = ranking, ranking.base
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6.5))
    layers = r.candidates
    width = 0.4
    top.bar([i - width / 2 for i in layers], [100 * (1 - r.keep_only[i].kl / b.kl) for i in layers], width,
            label="held-out KL", color="tab:blue")
    if b.recall_kl > 0:
        top.bar([i + width / 2 for i in layers], [100 * (1 - r.keep_only[i].recall_kl / b.recall_kl) for i in layers],
                width, label="recall KL", color="tab:red")
    top.set_xlabel("layer kept as attention (alone)")
    top.set_ylabel("reduction vs the run's student (%)")
    top.legend(fontsize=8)
    top.set_title("What keeping one layer as attention recovers")
    ks = list(range(len(r.path) + 1))
    bottom.plot(ks, [b.kl] + [f.kl for _, f in r.path], "o-", color="tab:blue", label="held-out KL")
    bottom.plot(ks, [b.recall_kl] + [f.recall_kl for _, f in r.path], "o-", color="tab:red", label="recall KL")
    for k, (layer, fit) in enumerate(r.path, 1):
        bottom.annotate(str(layer), (k, fit.recall_kl), textcoords="offset points", xytext=(0, 6), fontsize=8)
    bottom.set_xlabel("attention layers kept (greedy; the label is the layer added)")
    bottom.set_ylabel("nats per token")
    bottom.set_yscale("log")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rank_run(cfg) -> Path:
    """`distill rank`: write summary.md, ranking.json and layer_choice.png into cfg.out (default RUN/rank)."""
    from .config import ConfigError
    from .inspect import held_out_batches
    from .precision import resolve
    from .run_folder import load_run
    from .trainer import pick_device

    for key in ("keep", "batches", "recall_window"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be at least 1")
    if cfg.recall_weight < 0 or cfg.recall_sink < 0:
        raise ConfigError("recall_weight and recall_sink must not be negative")
    device = pick_device(cfg.device)
    run = load_run(cfg.checkpoint, device)
    # The teacher's blocks run inside the float32 student (hybrid_view; autocast sets the matmuls' dtype). Module's
    # own float(): transformers refuses it on a model loaded from GGUF, whose weights are dequantized already.
    torch.nn.Module.float(run.teacher.model)
    if len(run.student.ssd_layers) < 2:
        raise ConfigError(f"{cfg.checkpoint}'s student has {len(run.student.ssd_layers)} SSD layer(s): nothing to rank")
    precision = resolve(cfg.precision, "float32", device).precision
    start = time.perf_counter()
    batches = [b.to(device) for b in held_out_batches(run, cfg.batches)]
    data = held_out(run.teacher, batches, precision, cfg.recall_window, cfg.recall_sink, cfg.recall_margin)
    ranking = choose_layers(run.student, run.teacher, data, cfg.keep, cfg.recall_weight, precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = Path(cfg.out or Path(cfg.checkpoint) / "rank")
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "checkpoint": str(run.checkpoint) if run.checkpoint else None,
        "seconds": seconds, "device": where, "precision": precision,
        "recall_fraction": data.recall_fraction, "recall_weight": cfg.recall_weight,
        "base": asdict(ranking.base),
        "keep_only": {i: asdict(f) for i, f in ranking.keep_only.items()},
        "convert_only": {i: asdict(f) for i, f in ranking.convert_only.items()},
        "path": [{"layer": layer, **asdict(fit)} for layer, fit in ranking.path],
    }
    (out / "ranking.json").write_text(json.dumps(record, indent=1))
    plot(ranking, out / "layer_choice.png")
    (out / "summary.md").write_text(summary(cfg.checkpoint, ranking, data, seconds, where))
    return out
