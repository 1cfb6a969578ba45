"""`distill export`: a student as a Hugging Face folder that plain transformers and stock lm-eval load.

The folder holds config.json (with `auto_map`), safetensors weights, the tokenizer, and the student's own code as
remote code: the modeling and configuration files copied from distill/models/student/, and the kernel files copied
from distill/kernels/ (its __init__.py written as ssd_kernels.py, the name the modeling file imports). Files are
copied, never rewritten, so an export runs exactly the code that was trained. Written to a temporary folder, then
renamed into place. The folder it replaces must be empty or an earlier export: any other folder is refused, as
replacing it would delete files that are not an export's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .checkpoint import atomic_folder
from .config import ConfigError, check_output_folder
from .models import student as student_package

STUDENT_DIR = Path(student_package.__file__).parent
KERNELS_DIR = Path(__file__).parent / "kernels"


def _kernel_files() -> dict[str, Path]:
    """Export name -> source file: the dispatcher as ssd_kernels.py, then the kernels it imports relatively."""
    files = {"ssd_kernels.py": KERNELS_DIR / "__init__.py"}
    for path in sorted(KERNELS_DIR.glob("*.py")):
        if path.name != "__init__.py":
            files[path.name] = path
    return files


def is_export(folder: Path) -> bool:
    """A folder `distill export` wrote: its config.json maps AutoModelForCausalLM to the copied modeling file."""
    try:
        auto_map = json.loads((folder / "config.json").read_text()).get("auto_map", {})
    except (OSError, ValueError, AttributeError):
        return False
    model = auto_map.get("AutoModelForCausalLM", "") if isinstance(auto_map, dict) else ""
    return str(model).startswith("modeling_distill.") and (folder / "modeling_distill.py").is_file()


def export_target(out_dir: str | Path) -> Path:
    """The absolute folder to write an export to: new, empty, or an earlier export (which is replaced whole)."""
    out = check_output_folder(str(out_dir), "out")
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        shown = ", ".join(sorted(p.name for p in out.iterdir())[:3])
        raise ConfigError(
            f"out={out_dir} is a folder that is not an export (it holds {shown}...): give a new or empty folder; "
            "distill export replaces only an earlier export"
        )
    return out.resolve()  # `.` or `..` cannot be replaced by name


def export_student(student, tokenizer, out_dir: str | Path) -> Path:
    """Write `student` (a distill student model) and `tokenizer` as a Hugging Face folder at `out_dir`."""
    out = export_target(out_dir)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot make out={out_dir}: {err.strerror or err}") from None
    config_class, model_class = type(student.config).__name__, type(student).__name__
    with atomic_folder(out, prefix=f".{out.name}.tmp-") as tmp:
        student.config.auto_map = {
            "AutoConfig": f"configuration_distill.{config_class}",
            "AutoModelForCausalLM": f"modeling_distill.{model_class}",
        }
        student.config.architectures = [model_class]
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in ("configuration_distill.py", "modeling_distill.py"):
            shutil.copyfile(STUDENT_DIR / name, tmp / name)
        for name, source in _kernel_files().items():
            shutil.copyfile(source, tmp / name)
    return out


def export_run(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Export the student of a `distill train` run folder at its newest checkpoint (or of RUN/checkpoints/NAME)."""
    from .run_folder import load_run

    export_target(out_dir)  # before the run is loaded: a refused target costs nothing
    run = load_run(run_dir)
    return export_student(run.student, run.teacher.tokenizer, out_dir)
