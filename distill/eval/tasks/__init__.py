"""Offline twins of lm-eval tasks: YAML configs plus `offline.py`, the data loaders and document functions.

`TASKS_DIR` is the folder to hand lm-eval as `include_path`; it is found from the package, so it works from a
wheel as well as from the repository.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
