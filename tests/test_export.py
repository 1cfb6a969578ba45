"""`distill export`: a folder that plain transformers loads where distill is not installed, with the same logits,
working generate(), and stock lm-eval scoring it; for a random teacher and for one read from a GGUF file (whose
loading options must not reach the export's config.json)."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distill
from distill.cli import main
from distill.config import StudentConfig
from distill.export import export_student
from distill.models.transfer import build_student
from distill.run_folder import load_run
from tests.test_eval import DATA_DIR

DATA_FILES = Path(distill.__file__).parent / "data_files"

# Loads the export in a fresh interpreter where `import distill` fails, runs it on the saved ids, greedy-generates.
LOAD_WITHOUT_DISTILL = """
import sys, json, torch
sys.modules["distill"] = None  # the export must not need this package
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, ids_path, out_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_path)
with torch.no_grad():
    logits = model(ids).logits
    generated = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "generated": generated, "module": type(model).__module__}, out_path)
"""


@pytest.fixture(scope="module", params=["random", "gguf"])
def exported(request, tmp_path_factory):
    """(run folder, export) of a tiny run: a random in-memory teacher, or a tiny Llama read from a GGUF file."""
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    run_dir = root / "run"
    teacher = []
    if request.param == "gguf":
        _, gguf = request.getfixturevalue("tiny_gguf")
        teacher = ["teacher.name=tiny-gguf", "teacher.source=gguf", f"teacher.path={gguf}"]
    # The export, not the training, is under test: the first 8 kB of the bundled text (tokenizing all of it takes
    # seconds), no held-out perplexity.
    with gzip.open(DATA_FILES / "gutenberg_sample.jsonl.gz", "rt") as f:
        text = json.loads(f.readline())["text"][:8192]
    (root / "text.txt").write_text(text)
    assert main(["train", "experiment=tiny", f"run_dir={run_dir}", "pipeline=[stage2]", "stages.stage2.tokens=512",
                 f"data.path={root / 'text.txt'}", "data.holdout_tokens=0", *teacher]) == 0
    assert main(["export", f"checkpoint={run_dir}", f"out={root / 'hf'}"]) == 0
    return run_dir, root / "hf"


def test_export_loads_without_distill_and_matches(exported, tmp_path):
    run_dir, folder = exported
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_distill.DistillLlamaForCausalLM"
    assert config["attention_layers"] == [1]
    # Nothing of how the teacher was loaded (a GGUF teacher's quantization_config above all: with it, stock
    # lm-eval refuses the folder) nor where it came from; the dtype is the student's own.
    assert not {"quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash"} & set(config)
    assert config["dtype"] == "float32"
    check_loads_without_distill(load_run(run_dir).student, folder, tmp_path)


def test_export_of_a_larger_state(tiny_llama, tmp_path):
    """student.d_state at twice the head size: the export keeps it in its config, and transformers' load of the
    folder gives the same logits and greedy generation (a hybrid, so that the cache holds both kinds of layer)."""
    student = build_student(tiny_llama, StudentConfig(form="mamba2", d_state=32), attention_layers=[1]).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the transfer closes the gates and zeroes C's extra rows: make every part count
        for name, p in student.named_parameters():
            if ".self_attn.in_proj" in name or name.endswith("self_attn.D"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    folder = export_student(student, tiny_llama.tokenizer, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["ssd_mixer"]["d_state"] == 32
    check_loads_without_distill(student, folder, tmp_path)


def check_loads_without_distill(student, folder: Path, tmp_path: Path) -> None:
    """`folder` loaded by transformers in a process without distill: `student`'s logits and greedy generation."""
    vocab = student.config.vocab_size
    ids = torch.randint(0, vocab, (2, 70), generator=torch.Generator().manual_seed(torch.seed() % 2**31))
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_DISTILL, str(folder), str(tmp_path / "ids.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=tmp_path)
    out = torch.load(tmp_path / "out.pt")
    assert out["module"].startswith("transformers_modules.")  # the folder's own code, not distill's
    with torch.no_grad():
        expected = student(ids).logits
    assert ((out["logits"] - expected).abs().max() / expected.abs().max()).item() < 1e-5
    # Greedy generation equals re-running the growing sequence and taking the argmax, token by token.
    seq = ids[:1, :8]
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, student(seq).logits[:, -1:].argmax(-1)], dim=1)
    generated = out["generated"]  # generate() stops early if it produces EOS; compare what it produced
    assert generated.shape[1] > 8 and torch.equal(generated, seq[:, : generated.shape[1]])


@pytest.mark.skipif(not (DATA_DIR / "SOURCES.md").is_file(), reason=f"no offline eval data at {DATA_DIR}")
def test_stock_lm_eval_scores_the_export(exported):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from distill.eval.tasks import TASKS_DIR

    _, folder = exported
    # Only the twins: indexing lm-eval's own ~15k task files would take most of this test's time.
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"data_dir": str(DATA_DIR)})
    results = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},trust_remote_code=True",
                                      tasks=["distill_arc_easy"], limit=2, task_manager=manager, batch_size=2,
                                      device="cuda" if torch.cuda.is_available() else "cpu")
    acc = results["results"]["distill_arc_easy"]["acc,none"]
    assert 0.0 <= acc <= 1.0
