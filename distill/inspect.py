"""`distill inspect`: look at a run. Pictures of teacher attention beside the student's mixing matrices, per-layer
fit, loss curves, and a ranking of layers by how badly the SSD fits them (the hint for which to keep as attention)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError, check_output_folder, device_named, make_folder
from .data import build_data
from .metrics_file import read_metrics
from .run_folder import load_run
from .stages.common import autocast
from .stages.stage1 import layer_matrix_loss
from .stages.stage2 import relative_error


@dataclass
class LayerFit:
    layer: int
    matrix: float  # stage-1 loss: mean over batch and heads of ||A - M||_F / sqrt(L)
    hidden: float  # stage-2 relative error: ||student block out - teacher block out|| / ||teacher block out||


def held_out_batches(run, batches: int) -> list[torch.Tensor]:
    """Held-out sequences of the run's data (training sequences where the run kept none apart)."""
    e = run.cfg.eval
    data = build_data(run.cfg.data, run.teacher.tokenizer)
    if len(data.holdout) >= e.seq_len:
        return data.holdout_batches(e.batch_size, e.seq_len, batches)
    stream = data.batches(e.batch_size, e.seq_len)
    return [next(stream)[1] for _ in range(batches)]


@torch.no_grad()
def layer_fits(run, batches: list[torch.Tensor], precision: str = "fp32") -> list[LayerFit]:
    """Each SSD layer's stage-1 distance and stage-2 relative error on `batches`, from one teacher pass each."""
    student, teacher = run.student, run.teacher
    sums = {i: [0.0, 0.0] for i in student.ssd_layers}
    for ids in batches:
        captured = teacher.capture(ids, student.ssd_layers).layers
        for i in student.ssd_layers:
            record, block = captured[i], student.model.layers[i]
            sums[i][0] += layer_matrix_loss(block, record, precision).item()
            with autocast(ids.device, precision):
                out = block(record.block_input.float())
            sums[i][1] += relative_error(out, record.block_output).item()
    n = len(batches)
    return [LayerFit(i, m / n, h / n) for i, (m, h) in sums.items()]


def rank(fits: list[LayerFit]) -> list[tuple[LayerFit, float]]:
    """Worst fit first: the mean of each layer's rank by stage-1 distance and by stage-2 relative error."""
    by_matrix = {f.layer: r for r, f in enumerate(sorted(fits, key=lambda f: -f.matrix))}
    by_hidden = {f.layer: r for r, f in enumerate(sorted(fits, key=lambda f: -f.hidden))}
    combined = [(f, (by_matrix[f.layer] + by_hidden[f.layer]) / 2) for f in fits]
    return sorted(combined, key=lambda fc: (fc[1], -fc[0].hidden))


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display on a training machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def plot_matrices(run, ids: torch.Tensor, layer: int, heads: list[int], path: Path) -> None:
    """Teacher attention | student mixing matrix | difference, for `heads` of `layer`, on one sequence."""
    plt = pyplot()
    record = run.teacher.capture(ids[:1], [layer]).layers[layer]
    block = run.student.model.layers[layer]
    A = record.attention_matrix()[0].float()
    M = block.self_attn.mixing_matrix(block.input_layernorm(record.block_input.float()))[0].float()
    fig, axes = plt.subplots(len(heads), 3, figsize=(13, 3.8 * len(heads)), squeeze=False)
    for row, h in zip(axes, heads):
        a, m = A[h], M[h]
        dist = (a - m).norm().item()
        # Attention rows sum to 1 and most weight sits on a few keys: a log scale shows the structure.
        top = torch.tensor(max(a.max().item(), m.abs().max().item(), 1e-3)).log10().item()
        for ax, mat, title in (
            (row[0], a.abs(), f"teacher attention A, layer {layer} head {h}"),
            (row[1], m.abs(), f"student |M|, layer {layer} head {h}"),
            (row[2], (a - m).abs(), f"|A - M|, Frobenius norm {dist:.3g}"),
        ):
            im = ax.imshow(
                mat.clamp_min(1e-4).log10().cpu().numpy(), cmap="magma", vmin=-4, vmax=top
            )  # one scale a row
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("key / input position j")
            ax.set_ylabel("query / output position i")
        fig.colorbar(im, ax=row.tolist(), shrink=0.8, label="log10 |value|")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_layer_fits(fits: list[LayerFit], num_layers: int, path: Path) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    layers = [f.layer for f in fits]
    ax1.bar(layers, [f.matrix for f in fits], color="tab:blue")
    ax1.set_ylabel("stage 1: ||A - M||_F / sqrt(L)")
    ax2.bar(layers, [f.hidden for f in fits], color="tab:orange")
    ax2.set_ylabel("stage 2: relative error")
    kept = sorted(set(range(num_layers)) - set(layers))
    for ax in (ax1, ax2):
        for k in kept:
            ax.axvspan(k - 0.4, k + 0.4, color="0.85")
    ax2.set_xlabel("layer (grey: kept as attention)")
    ax1.set_title("How well each SSD layer fits its teacher layer (held-out data)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_loss_curves(metrics_path: Path, path: Path) -> bool:
    rows = [r for r in read_metrics(metrics_path) if "step" in r]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if not stages:
        return False
    plt = pyplot()
    fig, axes = plt.subplots(1, len(stages), figsize=(4.5 * len(stages), 3.6), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        mine = [r for r in rows if r["stage"] == stage]
        steps = [r["step"] for r in mine]
        layers = list(mine[0].get("per_layer", {}))
        for layer in layers:
            ax.plot(steps, [r["per_layer"][layer] for r in mine], lw=0.6, alpha=0.6, label=f"layer {layer}")
        ax.plot(steps, [r["loss"] for r in mine], color="black", lw=1.6, label="mean")
        if len(layers) <= 8:  # a legend of more layers covers the curves; the thin lines then stand for all
            ax.legend(fontsize=7)
        else:
            ax.text(0.98, 0.95, f"thin: {len(layers)} layers; black: mean", transform=ax.transAxes, ha="right",
                    va="top", fontsize=7)
        losses = [r["loss"] for r in mine if r["loss"] > 0]
        if losses and max(losses) / min(losses) > 30:
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (thin: per layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def inspect_run(
    run_dir, out_dir=None, layers=None, heads=None, batches: int = 2, keep: int = 3, device: str = "cpu"
) -> Path:
    """Write the pictures and summary.md into out_dir (default RUN/inspect); return out_dir. `run_dir`: a run
    folder, or RUN/checkpoints/NAME for that checkpoint."""
    if batches <= 0 or keep <= 0:
        raise ConfigError(f"batches={batches} and keep={keep} must be positive")
    if out_dir:
        check_output_folder(str(out_dir), "out")
    device = str(device_named(device, "device"))
    run = load_run(run_dir, device)
    ssd = run.student.ssd_layers
    if layers is not None and any(i not in ssd for i in layers):
        raise ConfigError(f"layers={list(layers)}: draw SSD layers, of {ssd} (the others kept attention)")
    heads_there = run.student.config.num_attention_heads
    if heads is not None and any(not 0 <= h < heads_there for h in heads):
        raise ConfigError(f"heads={list(heads)}: the student has heads 0..{heads_there - 1}")
    out = make_folder(out_dir or run.path / "inspect", "out")
    data = [b.to(device) for b in held_out_batches(run, batches)]
    fits = layer_fits(run, data)
    ranked = rank(fits)
    if layers is None:  # the worst fit, and two spread over the rest
        worst = ranked[0][0].layer
        spread = [ssd[0], ssd[len(ssd) // 2], ssd[-1]]
        layers = list(dict.fromkeys([worst] + [i for i in spread if i != worst]))[:3]
    heads = heads if heads is not None else list(range(min(2, run.student.config.num_attention_heads)))
    pictures = []
    for layer in layers:
        name = f"matrices_layer{layer}.png"
        plot_matrices(run, data[0], layer, heads, out / name)
        pictures.append(name)
    plot_layer_fits(fits, run.teacher.num_layers, out / "layer_losses.png")
    pictures.append("layer_losses.png")
    if plot_loss_curves(run.path / "metrics.jsonl", out / "loss_curves.png"):
        pictures.append("loss_curves.png")

    lines = [
        f"# {run_dir}: how well each SSD layer fits its teacher layer",
        "",
        f"Measured on {len(data)} held-out batch(es) of {data[0].shape[0]} x {data[0].shape[1]} tokens, at the latest "
        f"checkpoint ({run.checkpoint.name if run.checkpoint else 'none: the student as transferred'}). Worst first: "
        "rank = mean of the ranks by stage-1 distance and by stage-2 relative error.",
        "",
        "| rank | layer | stage 1: mean ‖A − M‖_F / √L | stage 2: relative error |",
        "|---|---|---|---|",
    ]
    for n, (fit, _) in enumerate(ranked, 1):
        lines.append(f"| {n} | {fit.layer} | {fit.matrix:.4g} | {fit.hidden:.4g} |")
    worst = sorted(f.layer for f, _ in ranked[:keep])
    lines += [
        "",
        f"The {keep} worst-fit layers are the first to keep as attention in a hybrid:",
        f"`student.attention_layers=[{','.join(map(str, worst))}]`",
        "",
        *[f"![{p}]({p})" for p in pictures],
        "",
    ]
    (out / "summary.md").write_text("\n".join(lines))
    return out
