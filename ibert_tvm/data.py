"""Real English sentences, fetched at run time from PyPI (never committed; see ../shared/DATA.md).

The `vadersentiment` 3.3.2 source distribution (MIT) carries 10,605 Rotten Tomatoes sentences
with human sentiment ratings; they serve as calibration text for the default model.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

VADER = "vadersentiment==3.3.2"
MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
    d = Path(os.environ.get("IBERT_TVM_CACHE", Path.home() / ".cache" / "ibert-tvm"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _vader_sdist() -> Path:
    dest = cache_dir() / "sdist"
    found = sorted(dest.glob("vaderSentiment-3.3.2.tar.gz")) + sorted(dest.glob("vadersentiment-3.3.2.tar.gz"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest), VADER]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"could not fetch {VADER} from PyPI for calibration text:\n{res.stderr[-2000:]}")
        found = sorted(dest.glob("*3.3.2.tar.gz"))
    return found[0]


def movie_sentences() -> list[tuple[float, str]]:
    """(mean rating in [-4, 4], sentence) for the 10,605 VADER movie-review snippets."""
    cached = cache_dir() / "movie_snippets.tsv"
    if not cached.exists():
        with tarfile.open(_vader_sdist()) as outer:
            member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            inner_bytes = outer.extractfile(member).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            member = next(m for m in inner.getmembers() if m.name.endswith(MOVIES.split("/")[-1]))
            text = inner.extractfile(member).read().decode("utf-8", errors="replace")
        tmp = cached.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(cached)
    rows = []
    for line in cached.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((float(parts[1]), parts[2].strip()))
    return rows
