"""Why a local data file cannot be read, in words: looked for only once `datasets` has failed on the files.

`datasets` says "An error occurred while generating the dataset" (or a bare StopIteration) for an empty file, a file
that is not JSON lines and one that is not text at all; `file_problem` reads the file itself and names what is wrong
and where (the first bad line), so the user knows which file to fix and how.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

GZIP_MAGIC = b"\x1f\x8b"


def _lines(path: Path):
    """The file's lines as bytes, through gzip where the name ends in .gz."""
    if path.suffix == ".gz":
        with open(path, "rb") as raw:
            if raw.read(2) != GZIP_MAGIC:
                raise _Problem("is not gzip'ed, although its name ends in .gz")
        opener = gzip.open
    else:
        opener = open
    try:
        with opener(path, "rb") as f:
            yield from f
    except EOFError:
        raise _Problem("is cut short: its gzip stream ends early (a partial copy or an interrupted write?)") from None
    except (gzip.BadGzipFile, zlib.error) as err:
        raise _Problem(f"is a damaged gzip file ({err})") from None


class _Problem(Exception):
    pass


def _json_kind(value) -> str:
    return {dict: "object", list: "list", str: "string", bool: "true/false"}.get(type(value), type(value).__name__)


def file_problem(path: str | Path, as_text: bool, field: str = "text") -> str | None:
    """What makes `path` unreadable as a data file (`as_text`: plain text, else JSON lines or one JSON document),
    as the end of a sentence that starts with the file's name; None where nothing is wrong with it."""
    path = Path(path)
    expect_lines = as_text or path.name.removesuffix(".gz").endswith(".jsonl")
    whole: list[bytes] = []  # a .json file may hold one document over many lines; kept only for those
    first_bad: str | None = None
    try:
        offset, content = 0, False
        for number, line in enumerate(_lines(path), 1):
            nul = line.find(b"\0")
            if nul >= 0:
                return f"is not text (binary: a NUL byte on line {number}, byte {offset + nul})"
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"is not UTF-8 text (binary, or another encoding): line {number}, byte {offset + err.start}"
            offset += len(line)
            content = content or bool(text.strip())
            if as_text or not text.strip():
                continue
            if not expect_lines:
                whole.append(line)
            if first_bad is None:
                try:
                    row = json.loads(text)
                except ValueError as err:
                    first_bad = f"is not JSON lines: line {number} is not JSON ({err.msg} at column {err.colno})"
                    continue
                if not isinstance(row, dict):
                    first_bad = (f"is not JSON lines: line {number} is a JSON {_json_kind(row)}, not an object "
                                 f'(one {{"{field}": ...}} per line)')
    except _Problem as problem:
        return str(problem)
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if not content:
        return "is empty (no text)"
    if first_bad and whole:  # a .json file that is one JSON document (a list of objects) is fine
        try:
            json.loads(b"".join(whole))
            return None
        except ValueError:
            pass
    return first_bad
