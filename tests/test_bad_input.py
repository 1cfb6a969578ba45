"""Bad input and damaged files, as a user meets them from the command line: each is answered with one line,
`distill: error: ...` and a non-zero exit (no traceback), that says what is wrong and what to change; a damaged
checkpoint is passed over by a resume, which ends where an undamaged run ends."""

import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.checkpoint import MANIFEST, RunState, damage, resume_point, save_checkpoint, write_files
from distill.cli import main
from distill.eval.tasks.offline import REQUIRED_FILES

TINY = ["experiment=tiny"]
# One stage, a checkpoint every 2 of its 8 steps: keep_checkpoints=2 leaves stage2-step000006 and stage2-done.
RUN_ARGS = [*TINY, "pipeline=[stage2]", "trainer.checkpoint_every=2"]


def refused(capsys, argv, *parts, code=2):
    """Run `distill ARGV`: it must exit with `code` and end with one `distill: error:` line holding every part."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("distill: error:")]
    assert rc == code and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run (stage 2 only) and what its last checkpoint and log held when it was written."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *RUN_ARGS, f"run_dir={run}"]) == 0
    done = run / "checkpoints" / "stage2-done"
    return run, load_file(done / "model.safetensors"), (run / "metrics.jsonl").read_text()


@pytest.fixture
def run(trained, tmp_path):
    """A copy of the trained run folder, free to damage."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _rows(log: str) -> list[dict]:
    """metrics.jsonl's rows without their speed (the one figure a rerun of the same steps changes)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in log.splitlines()]


def truncate(path: Path, size: int = 1000) -> None:
    os.truncate(path, size)


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# -- damaged checkpoints -------------------------------------------------------------------------------------------


def test_the_manifest_holds_the_size_and_sha256_of_every_file_written_before_it(tmp_path):
    """write_files (both the one-process and the DeepSpeed save) ends with the manifest, covering files already in
    the folder (DeepSpeed's partitions) too; damage() finds a changed byte and a cut file by name."""
    (tmp_path / "deepspeed").mkdir()
    (tmp_path / "deepspeed" / "rank0.pt").write_bytes(os.urandom(3000))
    weights = {"w": torch.randn(17, 5, generator=torch.Generator().manual_seed(torch.seed() % 2**31))}
    write_files(tmp_path, weights, {"moments": torch.randn(4)}, RunState(step=3))
    listed = json.loads((tmp_path / MANIFEST).read_text())["files"]
    assert set(listed) == {"model.safetensors", "trainer.pt", "state.json", "deepspeed/rank0.pt"}
    for name, entry in listed.items():
        data = (tmp_path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert damage(tmp_path) is None
    flip_byte(tmp_path / "deepspeed" / "rank0.pt")
    assert damage(tmp_path) == f"deepspeed/rank0.pt does not match its SHA-256 in {MANIFEST} (its bytes have changed)"
    assert damage(tmp_path, ("model.safetensors", "state.json")) is None  # only what a reader opens
    truncate(tmp_path / "model.safetensors", 100)
    size = listed["model.safetensors"]["bytes"]
    assert damage(tmp_path, check_hashes=False) == f"model.safetensors is 100 bytes, its {MANIFEST} says {size}"


def test_a_resume_passes_over_a_cut_checkpoint_and_ends_as_the_undamaged_run(trained, run, capsys):
    """The newest checkpoint's weights cut short (a full disk, a partial copy): the same command says which
    checkpoint it passes over and why, goes on from the newest intact one, and ends bit for bit where the run ended
    before the damage, its log the same."""
    _, weights, log = trained
    size = (run / "checkpoints" / "stage2-done" / "model.safetensors").stat().st_size
    truncate(run / "checkpoints" / "stage2-done" / "model.safetensors")
    assert main(["train", *RUN_ARGS, f"run_dir={run}"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill:")]
    assert notes == [
        "distill: resuming from stage2-step000006, the newest intact checkpoint, passing over damaged stage2-done: "
        f"model.safetensors is 1000 bytes, its {MANIFEST} says {size}"
    ]
    again = load_file(run / "checkpoints" / "stage2-done" / "model.safetensors")
    assert set(again) == set(weights) and all(torch.equal(again[k], weights[k]) for k in weights)
    assert _rows((run / "metrics.jsonl").read_text()) == _rows(log)
    assert damage(run / "checkpoints" / "stage2-done") is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["stage2-done", "stage2-step000006"]


def test_a_changed_byte_is_found_by_the_checksum(run, capsys):
    """Same size, other bytes: only the SHA-256 tells. The optimizer file is what a resume reads and export does
    not: the resume passes over the checkpoint, the export goes on (its weights are intact)."""
    flip_byte(run / "checkpoints" / "stage2-done" / "trainer.pt")
    assert main(["export", f"checkpoint={run}", f"out={run.parent / 'hf'}"]) == 0
    assert main(["train", *RUN_ARGS, f"run_dir={run}"]) == 0
    assert "passing over damaged stage2-done: trainer.pt does not match its SHA-256" in capsys.readouterr().err


def test_commands_that_read_a_run_name_the_damaged_file_and_the_way_on(run, tmp_path, capsys):
    """export, inspect and eval refuse a run whose newest checkpoint is damaged, rather than silently read an
    older student: the line names the file, the newest intact checkpoint, and how to use it or redo the steps."""
    truncate(run / "checkpoints" / "stage2-done" / "model.safetensors")
    intact = run / "checkpoints" / "stage2-step000006"
    parts = ("stage2-done is damaged (model.safetensors is 1000 bytes", "distill train", f"checkpoint={intact}")
    refused(capsys, ["export", f"checkpoint={run}", f"out={tmp_path / 'hf'}"], *parts)
    refused(capsys, ["inspect", f"checkpoint={run}"], *parts)
    data = tmp_path / "data"  # the offline task's file, present: eval gets as far as opening the run
    for name in REQUIRED_FILES["distill_arc_easy"]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("{}")
    refused(capsys, ["eval", f"checkpoint={run}", "tasks=[distill_arc_easy]", f"data_dir={data}"], *parts)
    assert not (tmp_path / "hf").exists() and not (run / "inspect").exists()
    assert main(["export", f"checkpoint={intact}", f"out={tmp_path / 'hf'}"]) == 0  # the way on it names
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["attention_layers"] == [1]
    refused(capsys, ["export", f"checkpoint={run / 'checkpoints' / 'stage2-done'}", f"out={tmp_path / 'x'}"],
            "stage2-done is damaged (model.safetensors")


def test_checkpoints_written_before_manifests_load_and_are_checked_by_their_structure(run, tmp_path, capsys):
    for manifest in (run / "checkpoints").glob(f"*/{MANIFEST}"):
        manifest.unlink()
    done = run / "checkpoints" / "stage2-done"
    assert damage(done) is None
    assert main(["export", f"checkpoint={run}", f"out={tmp_path / 'hf'}"]) == 0
    state = (done / "state.json").read_text()
    (done / "state.json").write_text(state[:20])
    assert damage(done) == "state.json is damaged (not the JSON of a run state)"
    (done / "state.json").write_text(state)
    truncate(done / "trainer.pt", 5000)
    assert damage(done) == "trainer.pt is damaged or cut short (no zip directory at its end)"
    size = (done / "model.safetensors").stat().st_size
    truncate(done / "model.safetensors", size - 1000)
    assert damage(done) == f"model.safetensors is {size - 1000} bytes, its header says {size}"
    truncate(done / "model.safetensors", 4)
    assert damage(done) == "model.safetensors is damaged (no readable safetensors header)"
    refused(capsys, ["export", f"checkpoint={run}", f"out={tmp_path / 'hf'}"], "model.safetensors is damaged",
            "stage2-step000006")


def test_a_run_whose_checkpoints_are_all_damaged_is_not_started_over(run, capsys):
    for folder in (run / "checkpoints").iterdir():
        if folder.is_dir():
            truncate(folder / "trainer.pt", 10)
    log = (run / "metrics.jsonl").read_text()
    refused(capsys, ["train", *RUN_ARGS, f"run_dir={run}"], "every checkpoint in", "is damaged",
            "trainer.pt is 10 bytes", "copy the run folder again")
    assert (run / "metrics.jsonl").read_text() == log  # nothing was thrown away


def test_pruning_never_deletes_the_intact_checkpoint_a_resume_falls_back_to(tmp_path):
    """A resume passed over a damaged checkpoint (step 4) and went on from step 2; its next checkpoint (step 3)
    must not prune step 2 to make room beside the damaged one: damage the new one too, and step 2 is still there to
    go on from. A damaged checkpoint is never counted; once behind the intact ones kept, it goes."""
    model = torch.nn.Linear(3, 3)
    for step in (1, 2, 4):
        save_checkpoint(tmp_path, f"s-step{step:06d}", model, None, RunState(step=step), keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["s-step000002", "s-step000004"]
    truncate(root / "s-step000004" / "model.safetensors", 10)
    assert resume_point(tmp_path)[0].name == "s-step000002"
    save_checkpoint(tmp_path, "s-step000003", model, None, RunState(step=3), keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["s-step000002", "s-step000003", "s-step000004"]
    truncate(root / "s-step000003" / "trainer.pt", 10)
    folder, passed = resume_point(tmp_path)
    assert folder.name == "s-step000002" and [p.split(":")[0] for p in passed] == ["s-step000004", "s-step000003"]
    save_checkpoint(tmp_path, "s-step000005", model, None, RunState(step=5), keep=2)  # the run moved past them
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [f"s-step00000{i}" for i in (2, 3, 4, 5)]
    save_checkpoint(tmp_path, "s-step000006", model, None, RunState(step=6), keep=2)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["s-step000005", "s-step000006"]


# -- output paths ---------------------------------------------------------------------------------------------------


def test_a_run_dir_that_cannot_be_a_folder(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path / 'file'}"], "is a file, not a folder")
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path / 'file' / 'run'}"], f"{tmp_path / 'file'} is a file")
    refused(capsys, ["train", *TINY, "run_dir="], "run_dir is empty")
    assert (tmp_path / "file").read_text() == "mine"


def test_export_replaces_only_an_earlier_export(run, tmp_path, capsys, monkeypatch):
    """out= a file, a path under a file, empty, or a folder holding other things (the current folder included) is
    refused and left as it was; an empty folder and an earlier export are written over."""
    (tmp_path / "file").write_text("mine")
    refused(capsys, ["export", f"checkpoint={run}", f"out={tmp_path / 'file'}"], "is a file, not a folder")
    refused(capsys, ["export", f"checkpoint={run}", f"out={tmp_path / 'file' / 'hf'}"], "is a file, not a folder")
    refused(capsys, ["export", f"checkpoint={run}", "out="], "out is empty")
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "a.txt").write_text("keep me")
    refused(capsys, ["export", f"checkpoint={run}", f"out={mine}"], "is a folder that is not an export",
            "replaces only an earlier export")
    monkeypatch.chdir(mine)
    refused(capsys, ["export", f"checkpoint={run}", "out=."], "is a folder that is not an export")
    assert (mine / "notes" / "a.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert main(["export", f"checkpoint={run}", f"out={tmp_path / 'empty'}"]) == 0
    (tmp_path / "empty" / "stale.bin").write_text("from before")
    assert main(["export", f"checkpoint={run}", f"out={tmp_path / 'empty'}"]) == 0  # an export: replaced whole
    assert not (tmp_path / "empty" / "stale.bin").exists() and (tmp_path / "empty" / "config.json").is_file()


def test_other_output_folders_under_a_file(run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    refused(capsys, ["compare", f"runs=[{run}]", f"out={blocker}"], f"out={blocker} is a file")
    refused(capsys, ["inspect", f"checkpoint={run}", f"out={blocker}"], f"out={blocker} is a file")
    refused(capsys, ["generate", "teacher=tiny-llama", "tokens=10", f"out={blocker}"], f"out={blocker} is a file")
    refused(capsys, ["eval", f"checkpoint={run}", f"out={blocker / 'results'}", "tasks=[distill_foo]"],
            f"{blocker} is a file")
    assert blocker.read_text() == "mine"


# -- errors raised while running, shown as one line -----------------------------------------------------------------


def test_a_loss_that_turns_nan_is_one_line_and_exit_1(tmp_path, capsys):
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path}", "pipeline=[stage1]", "stages.stage1.lr=1e30"],
            "stage1: the loss is nan at step", "no checkpoint had been written yet", "Lower stages.stage1.lr", code=1)
    # Past a stage's end its checkpoint is the one named.
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path / 'later'}", "pipeline=[stage1,stage2]",
                     "stages.stage2.lr=1e30"],
            "stage2: the loss is", "the latest checkpoint,", "stage1-done, is the last good one", code=1)


def test_eval_without_its_task_data(run, tmp_path, capsys, monkeypatch):
    """Refused before any model is loaded: the missing file and what to set."""
    monkeypatch.delenv("DISTILL_DATA_DIR", raising=False)
    refused(capsys, ["eval", f"checkpoint={run}", f"data_dir={tmp_path}", "tasks=[distill_arc_easy]"],
            f"distill_arc_easy needs {tmp_path / 'arc_easy' / 'test.json'}, which is missing", "set data_dir")
    refused(capsys, ["eval", f"checkpoint={run}"], "give data_dir=DIR", "DISTILL_DATA_DIR")
    refused(capsys, ["eval", f"checkpoint={run}", "tasks=[distill_foo]"], "unknown task 'distill_foo'")
    refused(capsys, ["eval", f"checkpoint={run}", "tasks=[]"], "no tasks given")
    refused(capsys, ["eval", f"checkpoint={tmp_path / 'nothing'}"], "neither a run folder")


# -- data files ----------------------------------------------------------------------------------------------------


def _gz(data: bytes) -> bytes:
    return gzip.compress(data)


def _cut_gz(field: str, value) -> bytes:
    """A gzip'ed JSON-lines file cut in the middle (of random text, so that the middle is not its end)."""
    rows = "".join(json.dumps({"text": os.urandom(40).hex(), field: value}) + "\n" for _ in range(200))
    data = gzip.compress(rows.encode())
    return data[: len(data) // 2]


DATA_CASES = {
    "empty.jsonl": (b"", "empty.jsonl is empty (no text)"),
    "blank.jsonl": (b"  \n\n", "blank.jsonl is empty (no text)"),
    "empty.jsonl.gz": (_gz(b""), "empty.jsonl.gz is empty (no text)"),
    "empty.txt": (b"", "empty.txt is empty (no text)"),
    "bad.jsonl": (b'{"text": "a"}\n{"text": "b"}\nnot json\n', "bad.jsonl is not JSON lines: line 3 is not JSON"),
    "bad.jsonl.gz": (_gz(b'{"text": "a"}\n{"text": \n'), "bad.jsonl.gz is not JSON lines: line 2 is not JSON"),
    "prose.json": (b"Some prose.\nMore.\n", "prose.json is not JSON lines: line 1 is not JSON"),
    "numbers.jsonl": (b"1\n2\n", 'line 1 is a JSON int, not an object (one {"text": ...} per line)'),
    "random.jsonl": (bytes(range(256)) * 8, "random.jsonl is not text (binary: a NUL byte on line 1, byte 0)"),
    "random.txt": (b"text \xff\xfe\x80 more", "random.txt is not UTF-8 text (binary, or another encoding): line 1, "
                   "byte 5"),
    "latin1.jsonl": ('{"text": "café"}\n'.encode("latin-1"), "latin1.jsonl is not UTF-8 text"),
    "plain.jsonl.gz": (b'{"text": "a"}\n', "plain.jsonl.gz is not gzip'ed, although its name ends in .gz"),
    "cut.jsonl.gz": (_cut_gz("n", "1"), "cut.jsonl.gz is cut short: its gzip stream ends"),
    "numbers_as_text.jsonl": (b'{"text": "a"}\n{"text": 5}\n', "field 'text' holds int values (5), not text"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_a_bad_data_file_is_named_with_what_is_wrong(tmp_path, capsys, name):
    content, message = DATA_CASES[name]
    (tmp_path / name).write_bytes(content)
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path / 'run'}", f"data.path={tmp_path / name}"], message)
    assert not (tmp_path / "run").exists()  # refused input leaves no run folder behind


def test_bad_data_paths_and_columns(tmp_path, capsys):
    (tmp_path / "docs").mkdir()
    run = f"run_dir={tmp_path / 'run'}"
    refused(capsys, ["train", *TINY, run, f"data.path={tmp_path / 'docs'}"], "is a folder: name its files",
            f"data.path={tmp_path / 'docs'}/*.jsonl")
    refused(capsys, ["train", *TINY, run, "data.path="], "data.path is empty")
    refused(capsys, ["train", *TINY, run, "data.path=a.jsonl,b.jsonl"], "quote a value that holds commas")
    shard = tmp_path / "shard.jsonl.gz"
    shard.write_bytes(_cut_gz("input_ids", [1, 2, 3]))  # a shard of `distill generate`, cut
    refused(capsys, ["train", *TINY, run, f"data.mix_path={shard}", "data.mix_fraction=0.5"],
            f"cannot read data.mix_path='{shard}': {shard} is cut short")
    refused(capsys, ["train", *TINY, run, "data.mix_path=pkg://gutenberg_sample.jsonl.gz", "data.mix_fraction=0.5",
                     "data.token_field=text"], "data.token_field='text' holds str values, not lists of token ids")


# -- numbers and names in the config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stages.stage1.lr=-1"], "stages.stage1.lr=-1.0 must be a number >= 0"),
        (["stages.stage1.lr=nan"], "stages.stage1.lr=nan must be a number >= 0"),
        (["stages.stage1.weight_decay=-0.1"], "stages.stage1.weight_decay=-0.1 must be a number >= 0"),
        (["stages.stage3.ce_weight=-1"], "stages.stage3.ce_weight=-1.0 must be a number >= 0"),
        (["stages.stage1.warmup_fraction=1.5"], "stages.stage1.warmup_fraction=1.5 must be between 0 and 1"),
        (["stages.stage1.min_lr_ratio=-1"], "stages.stage1.min_lr_ratio=-1.0 must be between 0 and 1"),
        (["stages.stage1.grad_clip=0"], "stages.stage1.grad_clip=0.0 must be positive (inf: no clipping)"),
        (["stages.stage1.tokens=1e6"], "could not be converted to Integer (write whole numbers out"),
        (["stages.stage1.tokens=1.5"], "stages.stage1.tokens=1.5"),
        (["trainer.log_every=0"], "trainer.log_every=0 must be positive"),
        (["trainer.checkpoint_every=-1"], "trainer.checkpoint_every=-1"),
        (["trainer.keep_checkpoints=-1"], "or 0 to keep all"),
        (["trainer.device=tpu9"], "trainer.device='tpu9' is not a device"),
        (["trainer.device=cuda:x"], "trainer.device='cuda:x' is not a device"),
        (["eval.holdout_batches=0"], "eval.holdout_batches=0 must be positive"),
        (["eval.batch_size=0"], "eval.batch_size=0 must be positive"),
        (["eval.seq_len=-5"], "eval.seq_len=-5 must be positive"),
        (["data.holdout_tokens=-5"], "data.holdout_tokens=-5 must be >= 0"),
        (["student.chunk_size=0"], "student.chunk_size=0 must be positive"),
        (["student.conv_kernel=-1"], "student.conv_kernel=-1 must be positive"),
        (["student.conv_activation=relu"], "student.conv_activation='relu': use identity or silu"),
        (["student.d_state=-1"], "student.d_state=-1: give 0 (the teacher's head size) or a size at least that"),
        (["student.d_state=8"], "student.d_state=8 is smaller than the teacher's head size 16: B and C start as"),
        (["stages.stage1.foo=1"], "Could not override 'stages.stage1.foo': Key 'foo' not in 'StageConfig'"),
        (["teacher=nope"], "Could not find 'teacher/nope'; options: llama-3.2-1b, phi-1_5, smollm2"),
        (["pipeline=stage1"], "Give a list: KEY=[a,b]"),
        (["trainer.seed=100000000000000000000"], "trainer.seed=100000000000000000000: give a seed from 0 to"),
        (["data.seed=-1"], "data.seed=-1: give a seed from 0 to 4294967295"),
        (["teacher.architecture.hidden_size=-4"], "teacher.architecture.hidden_size=-4 must be positive"),
        (["teacher.architecture.num_attention_heads=3"], "teacher.architecture does not make a llama model ("),
        (["teacher.source=hub", "teacher.path=NOCONFIG"], "teacher.path='NOCONFIG' is a folder without config.json"),
        (["teacher.source=gguf", "teacher.path=NOCONFIG/notes.txt"], "is not a GGUF file"),
        (["teacher.source=hub", "teacher.path=NOCONFIG/none"], "teacher.path='NOCONFIG/none' does not exist"),
    ],
)
def test_a_bad_number_or_name_in_the_config(tmp_path, capsys, overrides, message):
    folder = tmp_path / "folder"  # a folder that is not a model: no config.json
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    overrides = [o.replace("NOCONFIG", str(folder)) for o in overrides]
    message = message.replace("NOCONFIG", str(folder))
    refused(capsys, ["train", *TINY, f"run_dir={tmp_path / 'run'}", *overrides], message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "teacher=tiny-llama", "tokens=10", "out=OUT", "device=tpu9"], "device='tpu9' is not a device"),
        (["generate", "teacher=tiny-llama", "tokens=10"], "out= is required: `distill generate --help`"),
        (["compare", "out=x"], "runs= is required: `distill compare --help`"),
        (["export", "out=x"], "checkpoint= is required"),
        (["inspect", "checkpoint=RUN", "batches=0"], "batches=0 and keep=3 must be positive"),
        (["inspect", "checkpoint=RUN", "keep=-1"], "keep=-1 must be positive"),
        (["inspect", "checkpoint=RUN", "layers=[1]"], "layers=[1]: draw SSD layers, of [0, 2, 3]"),
        (["inspect", "checkpoint=RUN", "heads=[9]"], "heads=[9]: the student has heads 0..3"),
        (["inspect", "checkpoint=RUN", "device=tpu9"], "device='tpu9' is not a device"),
        (["eval", "checkpoint=RUN", "limit=0"], "limit=0.0: give documents per task"),
        (["eval", "checkpoint=RUN", "limit=-1"], "limit=-1.0"),
        (["eval", "checkpoint=RUN", "batch_size=0"], "batch_size=0 must be positive"),
        (["eval", "checkpoint=RUN", "max_length=-3"], "max_length=-3 must be positive"),
        (["eval", "checkpoint=RUN", "rolling_tokens=0"], "rolling_tokens=0 must be positive"),
        (["eval", "checkpoint=RUN", "bootstrap_iters=0"], "bootstrap_iters=0 must be positive"),
        (["eval", "checkpoint=RUN", "precision=fp16"], "precision='fp16': use bf16 or fp32"),
        (["eval", "checkpoint=RUN", "device=tpu9", "tasks=[distill_arc_easy]", "data_dir=DATA"],
         "device='tpu9' is not a device"),
        (["generate", "teacher=tiny-llama", "tokens=10", "out=OUT", "seed=-3"], "seed=-3: give a seed from 0 to"),
    ],
)
def test_a_bad_option_of_the_other_commands(run, tmp_path, capsys, argv, message):
    data = tmp_path / "data"
    for name in REQUIRED_FILES["distill_arc_easy"]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("{}")
    argv = [a.replace("RUN", str(run)).replace("DATA", str(data)).replace("OUT", str(tmp_path / "gen")) for a in argv]
    refused(capsys, argv, message)


# -- files of a run folder ------------------------------------------------------------------------------------------


def test_a_damaged_config_yaml(run, tmp_path, capsys):
    config = run / "config.yaml"
    config.write_text("teacher: [unclosed\n")
    for argv in (["train", *RUN_ARGS, f"run_dir={run}"], ["export", f"checkpoint={run}", f"out={tmp_path / 'hf'}"]):
        refused(capsys, argv, f"{config} is damaged (while parsing a flow sequence)", "restore it from a copy")
    config.write_text("")
    refused(capsys, ["train", *RUN_ARGS, f"run_dir={run}"], f"{config} is empty or not a distill config")


def test_metrics_cut_short_by_a_kill_and_damaged_in_the_middle(run, tmp_path, capsys):
    """A last line cut short (killed while it was appended) is dropped, quietly: its step is redone on resume. A
    line damaged in the middle is refused by name by the commands that only read the log; a resume, which
    rewrites it, drops it and says so."""
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines) + "\n" + lines[-1][:25])
    assert main(["compare", f"runs=[{run}]", f"out={tmp_path / 'cmp'}"]) == 0
    assert main(["train", *RUN_ARGS, f"run_dir={run}"]) == 0  # finished: resumes to do nothing
    assert metrics.read_text().splitlines() == lines
    metrics.write_text("\n".join(lines[:3] + ["garbage{"] + lines[3:]) + "\n")
    refused(capsys, ["compare", f"runs=[{run}]", f"out={tmp_path / 'cmp'}"],
            f"{metrics} is damaged: line 4 is not a JSON object")
    assert main(["train", *RUN_ARGS, f"run_dir={run}"]) == 0
    assert "metrics.jsonl: dropped line(s) [4]" in capsys.readouterr().err
    assert metrics.read_text().splitlines() == lines


def test_a_damaged_export_given_to_eval(run, tmp_path, capsys):
    export = tmp_path / "hf"
    assert main(["export", f"checkpoint={run}", f"out={export}"]) == 0
    truncate(export / "model.safetensors", 500)
    data = tmp_path / "data"
    for name in REQUIRED_FILES["distill_arc_easy"]:
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("{}")
    refused(capsys, ["eval", f"checkpoint={export}", "with_teacher=false", "tasks=[distill_arc_easy]",
                     f"data_dir={data}"], "is an export that cannot be loaded", "export it again")


def test_damaged_eval_results_and_generate_progress(run, tmp_path, capsys):
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text('{"student": ')
    refused(capsys, ["compare", f"runs=[{run}]", f"out={tmp_path / 'cmp'}"], "results.json is damaged",
            "run `distill eval`")
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "progress.json").write_text('{"settings": {"pro')
    refused(capsys, ["generate", "teacher=tiny-llama", "tokens=10", f"out={gen}"], "progress.json is damaged",
            "delete it and run again")


def test_generate_rewrites_a_missing_shard_where_it_was(tmp_path):
    """A shard lost from the middle of a generate folder (a partial copy) is written again at its own index, as
    the uninterrupted run wrote it, not in a later one's place."""
    out = tmp_path / "gen"
    args = ["generate", "teacher=tiny-llama", f"out={out}", "tokens=40", "batch_size=2", "new_tokens=8",
            "prompt_tokens=8", "progress=false", "device=cpu"]
    assert main(args) == 0
    written = {p.name: gzip.decompress(p.read_bytes()) for p in sorted(out.glob("shard-*.jsonl.gz"))}
    assert len(written) >= 3
    (out / "shard-00001.jsonl.gz").unlink()
    assert main(args) == 0
    again = {p.name: gzip.decompress(p.read_bytes()) for p in sorted(out.glob("shard-*.jsonl.gz"))}
    assert again == written
    assert [s["file"] for s in json.loads((out / "progress.json").read_text())["shards"]] == list(written)
