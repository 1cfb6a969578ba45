"""The `distill` command line: `distill COMMAND [hydra overrides]`.

Each command composes its Hydra config from conf/ (distill/conf in a wheel) with the overrides given, checks it, and
runs. Errors in the input end the program with one line that says what to change.
"""

from __future__ import annotations

import argparse
import re
import sys

GROUPS_HELP = """configuration groups (pick one with GROUP=NAME):
  teacher      smollm2 (default), phi-1_5, llama-3.2-1b, tiny-llama, tiny-phi
  student      discrete (Phi-Mamba mixer, default), mamba2
  data         gutenberg-sample (bundled, default), nltk-train ($DISTILL_DATA_DIR), c4 (hub); mix in generated
               text with data.mix_path=DIR/shard-*.jsonl.gz data.mix_fraction=0.5 data.token_field=input_ids
  stages       mohawk (stage1 matrix, stage2 hidden, stage3 logits)
  trainer      default, zero2, zero3 (DeepSpeed ZeRO: torchrun --nproc_per_node=N -m distill train trainer=zero2;
               zero3 also shards the student and, with trainer.teacher_zero3, the teacher)
  experiment   cpu_demo (default), tiny, gpu_smollm2 (one GPU, all 30 layers), gpu_smollm2_10min (the same at
               67M tokens), ablation_123 / _23 / _3 (stage ablation); ~experiment drops the preset

most used overrides:
  run_dir=runs/NAME                   where config, metrics.jsonl, checkpoints and summary.md go; the same
                                      command on the same run_dir resumes it (from its newest intact
                                      checkpoint). SIGTERM or Ctrl-C stops a run after its current step with a
                                      checkpoint (exit 128 + the signal's number)
  student.attention_layers=[3,9,15]   keep these teacher layers as attention (a hybrid)
  student.ssd_layers=[6,13]           or convert exactly these layers
  student.init_from=runs/pure         start from another run's trained SSD layers (e.g. a hybrid's stage 3
                                      from a pure student's stages 1-2; `distill rank` picks the layers)
  student.b_per_head=true             one B per head, not per KV group (starts as the same function)
  student.d_state=128                 SSD state size (0: the teacher's head size; larger starts as the same function)
  pipeline=[stage2,stage3]            which stages to run, in order
  stages.stage3.tokens=1000000        a stage's token budget (also batch_size, seq_len, lr, trainable,
                                      temperature, ce_weight, divergence=forward_kl|reverse_kl|jsd, on_policy:
                                      the fraction of stage-3 steps on text the student writes itself)
  data.path=/data/*.jsonl.gz          local json/jsonl/txt(.gz) files, or a hub dataset name
  teacher.source=hub teacher.path=HuggingFaceTB/SmolLM2-135M-Instruct
  trainer.device=cuda trainer.precision=bf16 kernels=torch
  trainer.cuda_graphs=true            replay each stage's whole step as one CUDA graph (CUDA, one process)

examples:
  distill train                                     the CPU demo (SmolLM2, 4 layers converted)
  distill train experiment=tiny run_dir=runs/try    seconds, a tiny random teacher
  distill train --cfg job teacher=phi-1_5 ~experiment  print the composed config and exit
"""


def compose(overrides: list[str], config_name: str = "config"):
    """The typed config (a dataclass of distill.config) of conf/CONFIG_NAME.yaml with these Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    from .config import ConfigError, config_dir

    try:
        with initialize_config_dir(config_dir=str(config_dir().resolve()), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=overrides)
        return OmegaConf.to_object(cfg)
    except Exception as err:  # whatever Hydra or OmegaConf raise here comes from the overrides given
        raise ConfigError(override_error(err, {"config": "train"}.get(config_name, config_name))) from err


def override_error(err: Exception, command: str = "COMMAND") -> str:
    """One line from Hydra's and OmegaConf's messages, which spread the reason over several lines or keep it in
    the exception's cause: what was refused, why, and the fix where there is a usual one."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    message = lines[0].rstrip(".") if lines else type(err).__name__
    cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
    if cause and cause not in message:
        message += f": {cause}"
    missing = re.search(r"missing mandatory value: (\S+)", message)
    if missing:
        return f"{missing.group(1)}= is required: `distill {command} --help` lists the overrides"
    if "is not a ListConfig" in message:
        message += " Give a list: KEY=[a,b]"
    if message.startswith("Ambiguous value"):  # a value with commas: Hydra reads a sweep
        message += "; quote a value that holds commas, e.g. \"data.path='a.jsonl,b.jsonl'\""
    elif "could not be converted to Integer" in cause and re.search(r"Value '[-+\d]*\.", cause):
        message += " (write whole numbers out: 1000000, not 1e6)"
    if len(lines) > 1 and lines[1].startswith("Available options in"):  # an unknown GROUP=NAME
        options = [line for line in lines[2:] if not line.startswith(("Config search path", "provider="))]
        message += f"; options: {', '.join(options)}"
    return message


def cmd_train(args) -> int:
    from omegaconf import OmegaConf

    cfg = compose(args.overrides)
    if args.cfg:
        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        return 0
    from .stopping import Stopped
    from .trainer import NonFiniteLoss, Trainer

    trainer = Trainer(cfg)
    try:
        trainer.run()
    except Stopped as stop:
        print(f"distill: {stop} (run folder {trainer.run_dir})", file=sys.stderr)
        return stop.exit_code
    except NonFiniteLoss as err:  # every rank of a DeepSpeed run sees it (the loss is all-reduced); one says it
        if trainer.is_main:
            print(f"distill: error: {err}", file=sys.stderr)
        return 1
    print(f"\nrun folder: {trainer.run_dir}\n")
    print(trainer.summary())
    return 0


def cmd_eval(args) -> int:
    cfg = compose(args.overrides, "eval")
    from .eval.run import run_eval

    _, table = run_eval(cfg)
    print(table)
    return 0


def cmd_generate(args) -> int:
    cfg = compose(args.overrides, "generate")
    from .generate import generate

    result = generate(cfg)
    print(
        f"{result['tokens']} tokens in {result['shards']} shards in {result['out']} "
        f"({result['generated_now']} now, {result['tokens_per_s']:.0f} tokens/s)\n"
        f"train on them: data.mix_path={result['out']}/shard-*.jsonl.gz data.mix_fraction=0.5 "
        "data.token_field=input_ids"
    )
    return 0


def cmd_inspect(args) -> int:
    cfg = compose(args.overrides, "inspect")
    from .inspect import inspect_run

    out = inspect_run(cfg.checkpoint, cfg.out, cfg.layers, cfg.heads, cfg.batches, cfg.keep, cfg.device)
    print((out / "summary.md").read_text())
    print(f"pictures and summary in {out}")
    return 0


def cmd_rank(args) -> int:
    cfg = compose(args.overrides, "rank")
    from .layer_choice import rank_run

    out = rank_run(cfg)
    print((out / "summary.md").read_text())
    print(f"table, numbers and picture in {out}")
    return 0


def cmd_compare(args) -> int:
    cfg = compose(args.overrides, "compare")
    from .compare import compare_runs

    out = compare_runs(list(cfg.runs), cfg.out, list(cfg.labels) if cfg.labels is not None else None)
    print((out / "compare.md").read_text())
    print(f"picture and table in {out}")
    return 0


def cmd_export(args) -> int:
    cfg = compose(args.overrides, "export")
    from .export import export_run

    out = export_run(cfg.checkpoint, cfg.out)
    print(f"exported to {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


GENERATE_HELP = """overrides:
  out=DIR tokens=N          the shard folder and how many tokens to generate (resumes if DIR has shards)
  teacher=NAME              the teacher group (default smollm2); data=NAME the prompts' text (default bundled)
  prompts=data|chat         prefixes of the data's text (prompt_tokens=32), or the chat template's reply start
  new_tokens=512 batch_size=1024 temperature=1.0 top_p=0.95 seed=0 device=auto precision=bf16 cuda_graph=true

writes DIR/shard-NNNNN.jsonl.gz (one JSON line per sequence: text, input_ids, prompt_tokens) and
DIR/progress.json; train on them with data.mix_path=DIR/shard-*.jsonl.gz data.mix_fraction=F
data.token_field=input_ids.
"""


INSPECT_HELP = """overrides:
  checkpoint=RUN_DIR   a `distill train` run folder (required); RUN_DIR/checkpoints/NAME for that checkpoint
  out=DIR              where to write (default: RUN_DIR/inspect)
  layers=[6,13] heads=[0,1] batches=2 keep=3 device=cpu

writes matrices_layer*.png (teacher attention | student mixing matrix | difference, log scale), layer_losses.png
(per-layer stage-1 distance and stage-2 relative error on held-out data), loss_curves.png (metrics.jsonl) and
summary.md (layers ranked worst fit first, and a student.attention_layers=[..] suggestion for a hybrid).
"""


RANK_HELP = """overrides:
  checkpoint=RUN_DIR   a `distill train` run folder (required), typically a pure SSD student after stages 1-2
  keep=6               grow the set of attention layers greedily up to this many
  recall_weight=1.0    score = KL / KL_0 + recall_weight * recall KL / recall KL_0 (relative to the run's student)
  batches=4 recall_window=16 recall_sink=4 recall_margin=1.0 device=auto precision=auto out=DIR

Each candidate hybrid is measured end to end on held-out text: the KL to the teacher over all positions, and over
the recall positions (where the teacher, with every attention layer limited to the last recall_window tokens plus
the first recall_sink, loses more than recall_margin nats on the true next token). Writes summary.md (the greedy
choice, each layer kept alone and converted alone, student.attention_layers=[..] suggestions), ranking.json and
layer_choice.png into out (default RUN_DIR/rank). Train a suggested hybrid from the run's SSD layers with
  distill train ... student.attention_layers=[..] student.init_from=RUN_DIR pipeline=[stage3]
"""


COMPARE_HELP = """overrides:
  runs=[runs/abl_123,runs/abl_23,runs/abl_3]   run folders that `distill train` wrote (required)
  labels=[1+2+3,2+3,3]                         one name per run (default: the folders' names)
  out=DIR                                      where to write (default: compare)

writes compare.png (each stage's mean loss against the tokens it has seen, one line per run; held-out perplexity
after each stage) and compare.md (tokens per stage, held-out perplexity, and the 6-task average with its standard
error and wikitext perplexity where `distill eval` wrote RUN/eval/results.json). Reads only the run folders' files.
"""


EVAL_HELP = """overrides:
  checkpoint=RUN_DIR        a `distill train` run folder: its student, beside its teacher (with_teacher=false: alone);
                            RUN_DIR/checkpoints/NAME: that checkpoint's (results in RUN_DIR/eval/results-NAME)
  checkpoint=EXPORT_DIR     an exported folder (loaded with trust_remote_code), beside teacher=NAME
  (no checkpoint)           the teacher group's model alone, e.g. teacher=smollm2
  tasks=[distill_offline]   offline twins (distill_lambada_openai, distill_hellaswag, distill_piqa, distill_arc_easy,
                            distill_arc_challenge, distill_winogrande, distill_wikitext) or lm-eval names (hub)
  data_dir=DIR              the offline twins' data (default: $DISTILL_DATA_DIR)
  limit=N batch_size=N max_length=N device=auto precision=bf16 out=STEM
  bootstrap_iters=1000      draws for bootstrapped standard errors (LAMBADA's perplexity; lm-eval's default 100000)

writes STEM.json and STEM.md (default stem: RUN/eval/results) and prints the table.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distill",
        description="Distil a pretrained Transformer into an SSD (Mamba-2) or hybrid student, MOHAWK-style.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, func, help, description, epilog):
        cmd = sub.add_parser(name, help=help, description=description, epilog=epilog,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.set_defaults(func=func)
        return cmd

    train = command(
        "train", cmd_train,
        "run the distillation stages (default: stage 1 -> 2 -> 3) into a run folder; resumes if it exists",
        "Run the pipeline's stages into run_dir; started again on the same run_dir, it resumes.",
        GROUPS_HELP,
    )
    train.add_argument("--cfg", nargs="?", const="job", metavar="job", help="print the composed config and exit")
    train.add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE or GROUP=NAME")
    command(
        "generate", cmd_generate,
        "let the teacher write training text (sampled continuations) into resumable shards",
        "Sample continuations from the teacher, batched, with a static KV cache and CUDA graphs on a GPU.",
        GENERATE_HELP,
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE or GROUP=NAME")
    command(
        "eval", cmd_eval,
        "score a run's student beside its teacher (or an export, or a teacher) with lm-eval",
        "Run lm-eval (offline twins or standard tasks) and write a JSON file and a Markdown table.",
        EVAL_HELP,
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    command(
        "export", cmd_export,
        "write a run's student as a Hugging Face folder (remote code) that transformers and lm-eval load",
        "Export the student at the run's latest checkpoint: config.json with auto_map, safetensors, tokenizer, "
        "and the student's modeling and kernel files.",
        "overrides:\n  checkpoint=RUN_DIR out=DIR     RUN_DIR/checkpoints/NAME for that checkpoint; DIR must be new, "
        "empty,\n                               or an earlier export (replaced)\n",
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    command(
        "inspect", cmd_inspect,
        "draw teacher attention beside the student's mixing matrices and rank layers by how badly they fit",
        "Pictures and a per-layer fit ranking of a run's student (the hint for a hybrid's layers).",
        INSPECT_HELP,
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    command(
        "rank", cmd_rank,
        "choose which layers a hybrid keeps as attention, by what the student loses end to end without them",
        "Measure hybrids of a run's student and the teacher on held-out text (KL to the teacher, and on the "
        "positions that need far context) and choose attention layers greedily.",
        RANK_HELP,
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    command(
        "compare", cmd_compare,
        "put several runs side by side: loss curves, held-out perplexity and lm-eval scores (ablations, sweeps)",
        "One picture and one table of several run folders, read from their metrics.jsonl and eval results.",
        COMPARE_HELP,
    ).add_argument("overrides", nargs="*", help="Hydra overrides, KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .config import ConfigError

    try:
        return args.func(args)
    except ConfigError as err:
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        # Hydra's own errors (unknown group option, bad override syntax, missing key) are input errors too.
        if type(err).__module__.startswith(("hydra", "omegaconf")):
            print(f"distill: error: {override_error(err)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
