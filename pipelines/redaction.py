"""Secrets never reach MLflow, manifests or the console: a config value under a key that names a
secret (token, secret, password, credential, api/access key) and the password inside a URL
(`scheme://user:password@host`) are replaced by '***'. Fingerprints still use the real values.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(r"(token|secret|passw(or)?d|credential|api_?key|access_?key|private_?key|(^|[_.])key)s?$",
                        re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@/\s]+@", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def redact_text(text: str) -> str:
    return URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with secrets masked."""
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v, key) for v in tree]
    if tree is not None and is_secret_key(key):
        return MASK
    return redact_text(tree) if isinstance(tree, str) else tree
