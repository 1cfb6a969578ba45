"""Offline lm-eval twins and the evaluation harness (distill/eval).

The twins must be lm-eval's own tasks on local files: same documents, prompts, targets and metrics. Each is checked
against the built-in task's config applied to the same raw fields, and run end to end on a tiny random Llama.
Data: $DISTILL_DATA_DIR, else ../shared/data beside the repository; tests that need it skip without it.
"""

from __future__ import annotations

import gzip
import json
import math
import os
from pathlib import Path

import pytest

from distill.eval.harness import (
    OFFLINE_GROUP,
    OFFLINE_TASKS,
    RAW_KEY,
    TASK_METRICS,
    evaluate,
    results_table,
    six_task_average,
    write_results,
)
from distill.eval.tasks import TASKS_DIR
from distill.eval.tasks.offline import split_wikitext_articles

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("DISTILL_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "SOURCES.md").is_file(),
    reason=f"offline eval data not found at {DATA_DIR} (set DISTILL_DATA_DIR to the folder holding SOURCES.md)",
)

# Documents per twin, as SOURCES.md reports for lm-eval 0.4.13 on these files.
DOC_COUNTS = {
    "distill_lambada_openai": 5153,
    "distill_hellaswag": 10042,
    "distill_piqa": 1838,
    "distill_arc_easy": 2376,
    "distill_arc_challenge": 1172,
    "distill_winogrande": 1267,
    "distill_wikitext": 62,
}

# The lm-eval task each twin copies: its YAML under lm_eval/tasks and the split it evaluates.
BUILTIN = {
    "distill_lambada_openai": "lambada/lambada_openai.yaml",
    "distill_hellaswag": "hellaswag/hellaswag.yaml",
    "distill_piqa": "piqa/piqa.yaml",
    "distill_arc_easy": "arc/arc_easy.yaml",
    "distill_arc_challenge": "arc/arc_challenge.yaml",
    "distill_winogrande": "winogrande/default.yaml",
    "distill_wikitext": "wikitext/wikitext.yaml",
}

# The first rows of the official hellaswag_val.jsonl (rowanz/hellaswag), i.e. the raw fields lm-eval's hellaswag
# reads; the text file of the twin holds them as its items 0, 1, 2 and 8.
HELLASWAG_OFFICIAL_ROWS = [
    (0, {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "label": "3", "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                                   "is holding a rubik's cube.", "starts pulling up roofing on a roof."]}),
    (1, {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
         "ctx_b": "the lady", "label": "3",
         "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                     "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."]}),
    (2, {"activity_label": "Canoeing",
         "ctx_a": "Two women in a child are shown in a canoe while a man pulls the canoe while standing in the water, "
                  "with other individuals visible in the background.",
         "ctx_b": "the child and a different man", "label": "2",
         "endings": ["are then shown paddling down a river in a boat while a woman talks.",
                     "are driving the canoe, they go down the river flowing side to side.",
                     "sit in a canoe while the man paddles.",
                     "walking go down the rapids, while the man in his helicopter almost falls and goes out of "
                     "canoehood."]}),
    (8, {"activity_label": "Sharpening knives",
         "ctx_a": "A man is holding a pocket knife while sitting on some rocks in the wilderness.",
         "ctx_b": "then he", "label": "1",
         "endings": ["opens a can of oil put oil on the knife, and puts oil on a knife and press it through a can "
                     "filled with oil then cuts several pieces from the sandwiches.",
                     "takes a small stone from the flowing river and smashes it on another stone.",
                     "uses the knife to shave his leg.", "sand the rocks and tops them by using strong pressure."]}),
]  # fmt: skip


# --------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def twins() -> dict:
    """The seven twin Task objects, built by lm-eval from the YAMLs with the data directory as metadata."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA_DIR)})
    return manager.load([OFFLINE_GROUP])["tasks"]


def builtin_task(yaml_relpath: str, raw_rows: list[dict]):
    """lm-eval's own task from its installed YAML, fed `raw_rows` (the HF dataset's fields) instead of the hub."""
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask

    path = Path(lm_eval.tasks.__file__).parent / yaml_relpath
    try:
        from lm_eval.tasks._yaml_loader import load_yaml  # lm-eval >= 0.4.10

        config = load_yaml(path)
    except ImportError:
        from lm_eval.utils import load_yaml_config

        config = load_yaml_config(str(path))
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    rows = datasets.Dataset.from_list(raw_rows)
    splits = {"train": rows, "validation": rows, "test": rows}
    config["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)
    return ConfigurableTask(config=config)


def rendered(task, doc) -> tuple:
    """Everything a request is built from: prompt, target and (for multiple choice) the choices."""
    choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
    return task.doc_to_text(doc), task.doc_to_target(doc), choices


def raw_rows(task) -> list[dict]:
    """The twin's documents as its custom dataset gives them, before any process_docs."""
    split = task.config.test_split or task.config.validation_split
    return list(task.dataset[split])


# --------------------------------------------------------------------------------------------- the twins
def test_group_and_yamls_list_the_seven_twins():
    yaml_tasks = sorted(p.stem for p in TASKS_DIR.glob("distill_*.yaml") if p.stem != OFFLINE_GROUP)
    assert yaml_tasks == sorted(OFFLINE_TASKS)
    group = (TASKS_DIR / f"{OFFLINE_GROUP}.yaml").read_text()
    assert all(f"- {name}\n" in group for name in OFFLINE_TASKS)
    assert all(name in TASK_METRICS for name in OFFLINE_TASKS)


@needs_data
def test_twin_document_counts(twins):
    assert sorted(twins) == sorted(OFFLINE_TASKS)
    counts = {name: len(list(task.eval_docs)) for name, task in twins.items()}
    assert counts == DOC_COUNTS


@needs_data
@pytest.mark.parametrize("name", [n for n in OFFLINE_TASKS if n != "distill_hellaswag"])
def test_twin_renders_like_builtin(twins, name):
    """Prompt, target and choices equal those of lm-eval's task on the same raw fields.

    Every document where the twin has code of its own (winogrande, wikitext); 1 in 8 where both share one Jinja
    template (rendering them all takes half a minute on 2 cores).
    """
    twin = twins[name]
    rows = raw_rows(twin)
    assert len(rows) == DOC_COUNTS[name]
    step = 1 if name in ("distill_winogrande", "distill_wikitext") else 8
    rows = rows[::step]
    builtin = builtin_task(BUILTIN[name], rows)
    assert twin.OUTPUT_TYPE == builtin.OUTPUT_TYPE
    assert twin.config.metric_list == builtin.config.metric_list
    twin_docs, builtin_docs = list(twin.eval_docs)[::step], list(builtin.eval_docs)
    assert len(twin_docs) == len(builtin_docs)
    for twin_doc, builtin_doc in zip(twin_docs, builtin_docs):
        assert rendered(twin, twin_doc) == rendered(builtin, builtin_doc)
    if name == "distill_wikitext":  # its metrics come from process_results: same word and byte counts
        for doc in twin_docs:
            assert twin.process_results(doc, [-1234.5]) == builtin.process_results(doc, [-1234.5])


@needs_data
def test_hellaswag_twin_renders_like_builtin_on_official_rows(twins):
    """The text file joins ctx_a and ctx_b; the twin must still give lm-eval's `ctx_a + " " + ctx_b.capitalize()`."""
    twin = twins["distill_hellaswag"]
    twin_docs = list(twin.eval_docs)
    builtin = builtin_task(BUILTIN["distill_hellaswag"], [row for _, row in HELLASWAG_OFFICIAL_ROWS])
    for (index, _), builtin_doc in zip(HELLASWAG_OFFICIAL_ROWS, builtin.eval_docs):
        assert rendered(twin, twin_docs[index]) == rendered(builtin, builtin_doc)
    assert twin.doc_to_text(twin_docs[0]) == "Roof shingle removal: A man is sitting on a roof. He"
    assert builtin.config.metric_list == twin.config.metric_list


@needs_data
def test_wikitext_articles_cover_the_file():
    text = (DATA_DIR / "wikitext-2/raw_reconstructed/wiki.test.raw").read_text(encoding="utf-8")
    articles = split_wikitext_articles(text)
    assert len(articles) == 62
    assert all(a.lstrip().startswith("= ") and not a.lstrip().startswith("= =") for a in articles)
    joined = "\n".join(articles)  # only the blank lines before the first title are dropped
    assert text.endswith(joined) and not text[: len(text) - len(joined)].strip()


@needs_data
def test_winogrande_answers_match_label_file():
    rows = [json.loads(line) for line in (DATA_DIR / "winogrande/dev.jsonl").read_text().splitlines()]
    labels = (DATA_DIR / "winogrande/dev-labels.lst").read_text().split()
    assert [r["answer"] for r in rows] == labels


# --------------------------------------------------------------------------------------------- evaluate
def tiny_llama_and_tokenizer():
    """A random 2-layer Llama and a byte-level BPE tokenizer trained in memory on a few KB of local text."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with gzip.open(DATA_DIR / "train_text/nltk_gutenberg.jsonl.gz", "rt", encoding="utf-8") as f:
        text = json.loads(f.readline())["text"][:20_000]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator([text], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>")

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval(), tokenizer


@needs_data
def test_evaluate_runs_all_twins_on_a_tiny_llama(tmp_path):
    pytest.importorskip("lm_eval")
    model, tokenizer = tiny_llama_and_tokenizer()
    limit = 3
    results = evaluate(model, tokenizer, OFFLINE_GROUP, data_dir=DATA_DIR, limit=limit, batch_size=4,
                       max_length=128, device="cpu")  # fmt: skip

    assert set(results) == {*OFFLINE_TASKS, RAW_KEY}
    for task in OFFLINE_TASKS:
        assert set(results[task]) == set(TASK_METRICS[task]), task
        for metric, value in results[task].items():
            assert math.isfinite(value), (task, metric)
            if metric.startswith("acc"):
                assert 0.0 <= value <= 1.0, (task, metric, value)
            else:  # a random model is far from perfect: every perplexity is well above 1
                assert value > 1.0, (task, metric, value)
    raw = results[RAW_KEY]
    assert {task: raw["n-samples"][task]["effective"] for task in OFFLINE_TASKS} == dict.fromkeys(OFFLINE_TASKS, limit)
    # 1,000 bootstrap draws (not lm-eval's 100,000), and every standard error still there
    assert raw["config"]["bootstrap_iters"] == 1000
    assert isinstance(raw["results"]["distill_lambada_openai"]["perplexity_stderr,none"], float)
    assert isinstance(raw["results"]["distill_piqa"]["acc_stderr,none"], float)
    assert raw["results"]["distill_wikitext"]["bits_per_byte,none"] > 0

    json_path, md_path = write_results(tmp_path / "tiny", {"teacher": results, "student": results})
    assert json.loads(json_path.read_text())["student"]["distill_piqa"] == results["distill_piqa"]
    assert "| average (6 tasks) | acc (%) |" in md_path.read_text()


@needs_data
def test_evaluate_errors_say_what_to_change(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    with pytest.raises(ValueError, match="unknown task 'hellaswagg'"):  # looked up in lm-eval's task index
        evaluate(None, None, ["distill_piqa", "hellaswagg"], data_dir=DATA_DIR)
    with pytest.raises(ValueError, match="unknown task 'distill_piqaa'"):  # the twin prefix is ours alone
        evaluate(None, None, "distill_piqaa", data_dir=DATA_DIR)
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "valid.jsonl").write_text((DATA_DIR / "piqa/valid.jsonl").read_text())
    with pytest.raises(FileNotFoundError, match=r"distill_piqa needs .*valid-labels\.lst.*set data_dir"):
        evaluate(None, None, "distill_piqa", data_dir=tmp_path)
    monkeypatch.delenv("DISTILL_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="need a data directory"):
        evaluate(None, None, ["distill_wikitext"])


# --------------------------------------------------------------------------------------------- tables
TEACHER = {
    "distill_lambada_openai": {"acc": 0.60, "perplexity": 4.0},
    "distill_hellaswag": {"acc_norm": 0.50},
    "distill_piqa": {"acc": 0.70},
    "distill_arc_easy": {"acc": 0.80},
    "distill_arc_challenge": {"acc_norm": 0.40},
    "distill_winogrande": {"acc": 0.60},
    "distill_wikitext": {"word_perplexity": 10.0},
    RAW_KEY: {"results": {}},
}
STUDENT = {
    "distill_lambada_openai": {"acc": 0.30, "perplexity": 10.0},
    "distill_hellaswag": {"acc_norm": 0.25},
    "distill_piqa": {"acc": 0.35},
    "distill_arc_easy": {"acc": 0.40},
    "distill_arc_challenge": {"acc_norm": 0.20},
    "distill_winogrande": {"acc": 0.51},
    "distill_wikitext": {"word_perplexity": 25.0},
}


def table_rows(table: str) -> dict[tuple[str, str], list[str]]:
    lines = table.strip().splitlines()
    assert lines[1].startswith("|---")
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    return {(row[0], row[1]): row[2:] for row in cells}


def test_results_table_average_and_ratio():
    rows = table_rows(results_table({"teacher": TEACHER, "student": STUDENT}))
    assert len(rows) == 9  # 8 task/metric rows and the average
    # teacher: (60 + 50 + 70 + 80 + 40 + 60) / 6 = 60; student: (30 + 25 + 35 + 40 + 20 + 51) / 6 = 33.5
    assert rows[("average (6 tasks)", "acc (%)")] == ["60.00", "33.50", f"{33.5 / 60:.3f}"]
    assert rows[("distill_piqa", "acc (%)")] == ["70.00", "35.00", "0.500"]
    assert rows[("distill_lambada_openai", "perplexity")] == ["4.00", "10.00", "2.500"]
    assert rows[("distill_wikitext", "word_perplexity")] == ["10.00", "25.00", "2.500"]
    assert six_task_average(STUDENT) == pytest.approx(33.5)


def test_results_table_one_column_and_missing_values():
    rows = table_rows(results_table({"student": {"piqa": {"acc": 0.5}, "distill_winogrande": {"acc": 0.25}}}))
    assert rows[("piqa", "acc (%)")] == ["50.00"]  # lm-eval's own task names are tabulated the same way
    assert rows[("average (6 tasks)", "acc (%)")] == ["—"]  # no average without all six accuracies
    three = table_rows(results_table({"a": TEACHER, "b": STUDENT, "c": STUDENT}))
    assert three[("average (6 tasks)", "acc (%)")] == ["60.00", "33.50", "33.50"]  # no ratio beyond two columns


def test_write_results(tmp_path):
    columns = {"teacher": TEACHER, "student": STUDENT}
    json_path, md_path = write_results(tmp_path / "eval" / "final", columns)
    assert (json_path.name, md_path.name) == ("final.json", "final.md")
    assert json.loads(json_path.read_text()) == columns
    assert md_path.read_text() == results_table(columns)


@needs_data
def test_perplexity_windows_are_batched_by_tokens_and_score_the_same(monkeypatch):
    """wikitext's windows go rolling_tokens // max_length at a time, whatever batch_size (the short tasks keep
    batch_size), and the word perplexity is the one of batching them batch_size at a time."""
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = tiny_llama_and_tokenizer()
    seen = []
    original = HFLM._loglikelihood_tokens

    def spy(self, requests, disable_tqdm=False, override_bs=None):
        seen.append(override_bs if override_bs is not None else self.batch_size)
        return original(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    monkeypatch.setattr(HFLM, "_loglikelihood_tokens", spy)
    capped = evaluate(model, tokenizer, ["distill_wikitext"], data_dir=DATA_DIR, limit=2, batch_size=16,
                      max_length=64, device="cpu", rolling_tokens=192)
    assert seen and max(seen) == 3 and len(seen) > 2  # 192 // 64 windows a batch, several batches
    seen.clear()
    whole = evaluate(model, tokenizer, ["distill_wikitext"], data_dir=DATA_DIR, limit=2, batch_size=16,
                     max_length=64, device="cpu", rolling_tokens=None)
    assert max(seen) == 16
    a, b = capped["distill_wikitext"]["word_perplexity"], whole["distill_wikitext"]["word_perplexity"]
    assert abs(a - b) < 1e-4 * b
