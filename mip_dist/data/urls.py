"""Training shard URLs: expansion of brace patterns and lists, and the checks made before any is read."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, TypeVar
from urllib.parse import urlparse

import webdataset as wds

from .shard_reader import DataError

ALLOWED_SCHEMES = ("", "file", "http", "https", "pipe")
T = TypeVar("T")


def check_urls(urls: list[str], allow_pipe: bool, key: str = "data.train_urls") -> list[str]:
    """Refuse `pipe:` (a shell command) unless allowed, unknown schemes, and missing local files."""
    if not urls:
        raise DataError(f"{key}: no shard URLs")
    for url in urls:
        scheme = urlparse(url).scheme if not url.startswith("pipe:") else "pipe"
        if len(scheme) == 1:  # a Windows drive letter, not a scheme
            scheme = ""
        if scheme == "pipe" and not allow_pipe:
            raise DataError(f"{key}: {url!r} is a 'pipe:' URL, which runs a shell command; "
                            f"set data.allow_pipe=true to allow it")
        if scheme not in ALLOWED_SCHEMES:
            raise DataError(f"{key}: unsupported URL scheme {scheme!r} in {url!r}; use a local path, "
                            f"file://, http(s):// or (with data.allow_pipe) pipe:")
        if scheme in ("", "file"):
            path = urlparse(url).path if scheme == "file" else url
            if not Path(path).is_file():
                raise DataError(f"{key}: shard {path} does not exist")
    return urls


def expand_urls(spec: str) -> list[str]:
    """Brace patterns (`train-{000000..000009}.tar`) and `::`-separated lists -> URL list."""
    return list(wds.shardlists.expand_urls(spec))


def listed_per_url(urls: list[str], index: Optional[dict], field: Callable[[dict], Optional[Any]],
                   kind: Callable[[Any], T] = int) -> dict[str, T]:
    """`field` of each url's train shard entry in index.json (as `kind`), for the urls the index lists (and has it)."""
    if index is None:
        return {}
    by_name = {s["name"]: field(s) for s in index["shards"] if s["split"] == "train"}
    return {u: kind(by_name[name]) for u in urls
            if by_name.get(name := Path(urlparse(u).path).name) is not None}
