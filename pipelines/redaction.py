"""Secrets never reach MLflow, manifests, Hydra's run folder or the console: a config value under a
key that names a secret (token, secret, password, credential, api/access key), the password inside a
URL (`scheme://user:password@host`) and a query parameter that names one (`?access_token=...`,
`&sig=...`) are replaced by '***'. Fingerprints still use the real values.
"""
from __future__ import annotations

import re
from typing import Any

MASK = "***"
SECRET_KEY = re.compile(r"(token|secret|passw(or)?d|credential|api_?key|access_?key|private_?key|(^|[_.])key)s?$",
                        re.IGNORECASE)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^:/@\s]+):[^@/\s]+@", re.IGNORECASE)
QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#\s]+)=)(?P<value>[^&;#\s'\"]+)")
SIGNATURE = re.compile(r"(^|[-_.])(sig|signature|auth|session|jwt|code)$", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(SECRET_KEY.search(str(key)))


def redact_text(text: str) -> str:
    text = URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    return QUERY_PARAM.sub(lambda m: m.group("head") + (MASK if is_secret_key(m.group("name")) or
                                                          SIGNATURE.search(m.group("name")) else m.group("value")), text)


def redact_override(override: str) -> str:
    """A Hydra command-line override (`key=value`, `+key=value`) with its value masked when the key names a
    secret, and URL passwords and secret query parameters masked in any case."""
    key, sep, value = override.partition("=")
    if sep and is_secret_key(key.lstrip("+~").rsplit(".", 1)[-1]):
        return f"{key}={MASK}"
    return redact_text(override)


def redact(tree: Any, key: str = "") -> Any:
    """A copy of a config tree (dicts, lists, scalars) with secrets masked."""
    if isinstance(tree, dict):
        return {k: redact(v, str(k)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [redact(v, key) for v in tree]
    if tree is not None and is_secret_key(key):
        return MASK
    return redact_text(tree) if isinstance(tree, str) else tree
