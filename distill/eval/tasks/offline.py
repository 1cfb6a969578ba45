"""Datasets and document functions of the offline lm-eval task twins.

Each `load_*` function is a `custom_dataset` of one twin YAML in this folder: lm-eval calls it with the task
metadata and dataset_kwargs as keyword arguments, so the data directory reaches it at run time as
`metadata["data_dir"]` (TaskManager(metadata=...) or `lm_eval --metadata '{"data_dir": ...}'`), else from the
environment variable DISTILL_DATA_DIR. It returns a DatasetDict whose rows carry the fields of the Hugging Face
dataset that lm-eval's own task reads, so the twin YAML can keep the official prompt templates.

lm-eval imports this file by its path (`!function offline.<name>`), not as part of the `distill` package, so it
imports nothing from `distill`.
"""

from __future__ import annotations

import bz2
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where used: the harness imports this module and should stay cheap to import
    import datasets

DATA_DIR_ENV = "DISTILL_DATA_DIR"

# Files each twin reads, relative to the data directory (SOURCES.md there says where each comes from).
REQUIRED_FILES: dict[str, tuple[str, ...]] = {
    "distill_lambada_openai": ("lambada_openai/lambada_test.jsonl",),
    "distill_hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "distill_piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "distill_arc_easy": ("arc_easy/test.json",),
    "distill_arc_challenge": ("arc_challenge/test.hf_fields.jsonl",),
    "distill_winogrande": ("winogrande/dev.jsonl",),
    "distill_wikitext": ("wikitext-2/raw_reconstructed/wiki.test.raw",),
}


# --------------------------------------------------------------------------------------------- file access
def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path:
    """The data directory given, else $DISTILL_DATA_DIR; raises with the fix when neither is set."""
    data_dir = data_dir or os.environ.get(DATA_DIR_ENV)
    if not data_dir:
        raise FileNotFoundError(
            f"offline eval tasks need a data directory: pass data_dir=... to distill.eval.harness.evaluate, "
            f"--metadata '{{\"data_dir\": \"...\"}}' to lm_eval, or set {DATA_DIR_ENV}"
        )
    return Path(data_dir).expanduser().resolve()


def missing_files(task: str, data_dir: str | os.PathLike | None) -> list[Path]:
    """The files `task` needs that are absent from the data directory."""
    root = resolve_data_dir(data_dir)
    return [root / name for name in REQUIRED_FILES[task] if not (root / name).is_file()]


def _data_file(task: str, name: str, data_dir: str | os.PathLike | None) -> Path:
    path = resolve_data_dir(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(
            f"{task} needs {path}: point data_dir (or {DATA_DIR_ENV}) at the folder that holds {name}"
        )
    return path


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _one_split(split: str, rows: list[dict[str, Any]]) -> datasets.DatasetDict:
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


# --------------------------------------------------------------------------------------------- LAMBADA
def load_lambada_openai(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """EleutherAI/lambada_openai (default) test: {"text"}; the file is the official OpenAI release."""
    path = _data_file("distill_lambada_openai", "lambada_openai/lambada_test.jsonl", data_dir)
    return _one_split("test", [{"text": row["text"]} for row in _read_jsonl(path)])


# --------------------------------------------------------------------------------------------- PIQA
def load_piqa(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """baber/piqa validation: {"goal", "sol1", "sol2", "label"}; labels live in a separate file upstream."""
    questions = _read_jsonl(_data_file("distill_piqa", "piqa/valid.jsonl", data_dir))
    labels = _read_lines(_data_file("distill_piqa", "piqa/valid-labels.lst", data_dir))
    if len(questions) != len(labels):
        raise ValueError(f"piqa: {len(questions)} questions but {len(labels)} labels in {data_dir}")
    rows = [
        {"goal": q["goal"], "sol1": q["sol1"], "sol2": q["sol2"], "label": int(label)}
        for q, label in zip(questions, labels)
    ]
    return _one_split("validation", rows)


# --------------------------------------------------------------------------------------------- ARC
def _arc_row(row: dict[str, Any]) -> dict[str, Any]:
    # The files add keys of their own (see SOURCES.md); keep the allenai/ai2_arc schema only.
    return {
        "id": row["id"],
        "question": row["question"],
        "choices": {"text": list(row["choices"]["text"]), "label": list(row["choices"]["label"])},
        "answerKey": row["answerKey"],
    }


def load_arc_easy(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """allenai/ai2_arc ARC-Easy test; the file is one JSON array."""
    path = _data_file("distill_arc_easy", "arc_easy/test.json", data_dir)
    return _one_split("test", [_arc_row(row) for row in json.loads(path.read_text(encoding="utf-8"))])


def load_arc_challenge(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """allenai/ai2_arc ARC-Challenge test (JSONL)."""
    path = _data_file("distill_arc_challenge", "arc_challenge/test.hf_fields.jsonl", data_dir)
    return _one_split("test", [_arc_row(row) for row in _read_jsonl(path)])


# --------------------------------------------------------------------------------------------- WinoGrande
def load_winogrande(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """allenai/winogrande winogrande_xl validation: {"sentence", "option1", "option2", "answer" ("1" | "2")}."""
    path = _data_file("distill_winogrande", "winogrande/dev.jsonl", data_dir)
    rows = [
        {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])}
        for r in _read_jsonl(path)
    ]
    return _one_split("validation", rows)


# lm-eval scores WinoGrande by "partial evaluation": each choice is the sentence up to the blank filled with one
# option, and the shared target is the rest of the sentence; doc_to_text names the gold choice.
def winogrande_doc_to_text(doc: dict[str, Any]) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: dict[str, Any]) -> str:
    blank = doc["sentence"].index("_")
    return doc["sentence"][blank + 1 :].strip()


def winogrande_doc_to_choice(doc: dict[str, Any]) -> list[str]:
    blank = doc["sentence"].index("_")
    return [doc["sentence"][:blank] + option for option in (doc["option1"], doc["option2"])]


# --------------------------------------------------------------------------------------------- HellaSwag
def load_hellaswag(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """HellaSwag validation from the 6-lines-per-item text file: {"context", "endings", "label"}, with the fields
    lm-eval's hellaswag task builds from them (query, choices, gold: hellaswag_doc).

    Each item is `activity_label + ": " + ctx`, the gold index, then the four endings. The file's maker already
    removed the [header]/[step]/[substeps]/[title] tags and joined ctx_a and ctx_b (see capitalize_ctx_b). The
    fields are built here, once, not by a process_docs: lm-eval applies that each time it asks for the documents
    (five times a run, a map over 10,042 rows each: 12 s of a 67 s eval of hellaswag alone, limit 1,500, on a
    2-core CPU, profiled 2026-12-04).
    """
    path = _data_file("distill_hellaswag", "hellaswag/hellaswag_val_full.txt.bz2", data_dir)
    with bz2.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
    rows = [
        hellaswag_doc({"context": lines[i], "endings": lines[i + 2 : i + 6], "label": lines[i + 1].strip()})
        for i in range(0, len(lines), 6)
    ]
    return _one_split("validation", rows)


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: WikiHow markup tags become sentence breaks or vanish."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?]\s+")


def capitalize_ctx_b(context: str) -> str:
    """Recover lm-eval's `ctx_a + " " + ctx_b.capitalize()` from the joined `label: ctx_a ctx_b` line.

    ActivityNet items end in ctx_b, the unfinished lowercase phrase after the last full sentence ("... a roof. he");
    WikiHow items have an empty ctx_b, so their context ends with the sentence's punctuation.
    """
    if context.endswith((".", "!", "?")):
        return context
    body_start = context.find(": ") + 2 if ": " in context else 0
    ends = [m.end() for m in _SENTENCE_END.finditer(context, body_start)]
    cut = ends[-1] if ends else body_start
    return context[:cut] + context[cut:].capitalize()


def hellaswag_doc(row: dict[str, Any]) -> dict[str, Any]:
    """The row with the fields lm-eval's hellaswag task builds: query, choices and gold."""
    return {
        **row,
        "query": hellaswag_preprocess(capitalize_ctx_b(row["context"])),
        "choices": [hellaswag_preprocess(ending) for ending in row["endings"]],
        "gold": int(row["label"]),
    }


# --------------------------------------------------------------------------------------------- WikiText
def _is_article_title(line: str) -> bool:
    # " = Title = " opens an article; section headings (" = = Section = = ") collapse to "== Section ==".
    collapsed = line.replace("= = =", "===").replace("= =", "==").strip()
    return collapsed.startswith("= ") and collapsed.endswith(" =")


def split_wikitext_articles(text: str) -> list[str]:
    """Cut raw WikiText into articles the way EleutherAI/wikitext_document_level does (62 in wiki.test.raw).

    An article runs from its title line to the next title line; blank text before a title is dropped, and the
    last article keeps whatever follows it.
    """
    articles: list[str] = []
    lines: list[str] = []
    for line in text.split("\n"):
        if _is_article_title(line):
            article = "\n".join(lines)
            if article.strip():
                articles.append(article)
            lines = []
        lines.append(line)
    articles.append("\n".join(lines))
    return articles


def load_wikitext(data_dir: str | None = None, **_: Any) -> datasets.DatasetDict:
    """EleutherAI/wikitext_document_level wikitext-2-raw-v1 test: {"page"}, one row per article."""
    path = _data_file("distill_wikitext", "wikitext-2/raw_reconstructed/wiki.test.raw", data_dir)
    pages = split_wikitext_articles(path.read_text(encoding="utf-8"))
    return _one_split("test", [{"page": page} for page in pages])


# (pattern, replacement) pairs of lm-eval's wikitext detokenizer, applied in order; `re` marks a regex.
_WIKITEXT_DETOKENIZE: tuple[tuple[str, str, bool], ...] = (
    ("s '", "s'", False),
    (r"/' [0-9]/", r"/'[0-9]/", True),
    (" @-@ ", "-", False),
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),
    ("\n ", "\n", False),
    (" N ", " 1 ", False),
    (" 's", "'s", False),
)


def wikitext_detokenize(doc: dict[str, Any]) -> str:
    """The article as running text: undo WikiText's spaces around punctuation and @-@ number separators."""
    text = doc["page"]
    for pattern, replacement, is_regex in _WIKITEXT_DETOKENIZE:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def wikitext_process_results(doc: dict[str, Any], results: list[float]) -> dict[str, tuple[float, int]]:
    """Loglikelihood paired with the word and byte counts that the perplexity aggregations divide by.

    As in lm-eval, words and bytes are counted in the tokenized page, before detokenization.
    """
    (loglikelihood,) = results
    words = len(re.split(r"\s+", doc["page"]))
    n_bytes = len(doc["page"].encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, words),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }
