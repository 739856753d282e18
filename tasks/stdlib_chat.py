"""The built-in chat task `stdlib_chat` (task.builtin=stdlib_chat, `+experiment=chat`): for each public
module-level function of Python's standard library with a docstring, a user asks what it does and
the assistant answers with the docstring's first sentence. Real answers from Python itself,
deterministic for a Python version (sorted, one record per function, an even sample of at most
MAX_RECORDS).

    records() -> [{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}, ...]
"""
from __future__ import annotations

import ast
import functools
import re
import sysconfig
from pathlib import Path

MAX_RECORDS = 1500
SKIPPED = {"test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "__pycache__", "site-packages",
           "ensurepip", "pydoc_data", "__phello__", "tkinter", "encodings"}
MAX_ANSWER_CHARS = 160


def first_sentence(docstring: str) -> str | None:
    """The docstring's first paragraph up to its first full stop, on one line; None when unusable."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    sentence = re.split(r"(?<=\.)\s", paragraph)[0]
    if not (12 <= len(sentence) <= MAX_ANSWER_CHARS) or not sentence[0].isupper() or "(" in sentence[:12]:
        return None
    return sentence


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_records(root: Path) -> list[dict]:
    """One conversation per usable function under the standard library's root."""
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).parts
        if SKIPPED & set(relative) or any(p.startswith("_") and p != "__init__.py" for p in relative):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = module_name(path, root)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                answer = first_sentence(ast.get_docstring(node) or "")
                if answer:
                    found.append({"messages": [{"role": "user", "content": f"What does {module}.{node.name}() do?"},
                                               {"role": "assistant", "content": answer}]})
    return found


@functools.cache  # reads about 800 files of the standard library; the same for the whole process
def records() -> list[dict]:
    found = all_records(Path(sysconfig.get_paths()["stdlib"]))
    return found[:: max(1, len(found) // MAX_RECORDS)][:MAX_RECORDS]
