#!/usr/bin/env python3
"""Build the 'termfaq' BEIR-layout retrieval test set (Python standard library only).

Sources (Debian bookworm packages; `apt-get download zsh-doc xterm`, `dpkg -x` each):
  zsh-doc 5.9   -> usr/share/doc/zsh-common/html: the Z-Shell FAQ (FAQ01..FAQ06.html) and the
                   zsh manual (every other page); licence: the zsh licence (MIT-style)
  xterm 379     -> usr/share/doc/xterm/xterm.faq.html: the XTerm FAQ by Thomas E. Dickey;
                   licence: X11-style permission notice
(see LICENSE.md beside the set).

Queries = FAQ headings that end in '?' (question number stripped), from both FAQs.
Qrels   = each question -> its own answer section (one judged section per question).
Corpus  = every section of both FAQs and of the zsh manual (split at every h1..h4 heading),
          heading text removed, navigation, tables of contents and index pages dropped, sections
          under 5 words dropped.

A link whose text is some section's heading (the FAQs' in-page lists of their own questions)
is dropped: otherwise the query text would appear verbatim in the *referring* section.

Usage: build_termfaq.py ZSH_HTML_DIR XTERM_FAQ_HTML OUT_DIR
"""
import glob
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from beir_files import write_beir  # noqa: E402
from html.parser import HTMLParser

MIN_WORDS = 5
HEADINGS = {"h1", "h2", "h3", "h4"}
SKIP_CLASSES = {"header", "nav", "contents", "shortcontents", "menu", "footnote"}
VOID = {"br", "img", "hr", "meta", "link", "input", "col", "area", "base", "wbr"}
SKIP_PAGES = re.compile(r"(^index|^zsh_(toc|abt|ovr)|Index|^FAQ\.html$|^The-Zsh-FAQ)")
NUMBER = re.compile(r"^\s*(Chapter\s+\d+:|\d+(\.\d+)*[:.]?)\s*")


class Sectioner(HTMLParser):
    """Splits a page into sections at headings; link texts are kept apart so they can be
    dropped later."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections = [{"title": None, "parts": []}]
        self.skip_depth = 0  # >0 inside a skipped element (nested tags counted)
        self.heading = None
        self.link = None

    def handle_starttag(self, tag, attrs):
        if tag in VOID:
            if tag == "br":
                self.data(" ")
            return
        classes = set((dict(attrs).get("class") or "").split())
        if self.skip_depth:
            self.skip_depth += 1
            return
        if tag in ("script", "style", "head") or classes & SKIP_CLASSES:
            self.skip_depth = 1
            return
        if tag in HEADINGS:
            self.heading = []
        elif tag == "a" and self.heading is None:
            self.link = []
        elif tag in ("p", "div", "li", "dt", "dd", "pre", "tr", "blockquote"):
            self.data(" ")

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if self.skip_depth:
            self.skip_depth -= 1
            return
        if tag in HEADINGS and self.heading is not None:
            title = re.sub(r"\s+", " ", "".join(self.heading)).strip()
            self.sections.append({"title": title, "parts": []})
            self.heading = None
        elif tag == "a" and self.link is not None:
            self.sections[-1]["parts"].append(("link", "".join(self.link)))
            self.link = None

    def handle_data(self, data):
        if not self.skip_depth:
            self.data(data)

    def data(self, text):
        if self.heading is not None:
            self.heading.append(text)
        elif self.link is not None:
            self.link.append(text)
        else:
            self.sections[-1]["parts"].append(("text", text))


def page_sections(path):
    p = Sectioner()
    with open(path, encoding="utf-8", errors="replace") as f:
        p.feed(f.read())
    return [s for s in p.sections if s["title"]]


def norm(s):
    return re.sub(r"\s+", " ", NUMBER.sub("", s)).strip().lower()


def body(section, headings):
    parts = [t for kind, t in section["parts"] if kind == "text" or norm(t) not in headings]
    return re.sub(r"\s+", " ", " ".join(parts)).strip()


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    zsh_dir, xterm_faq, out_dir = sys.argv[1:]
    pages = []  # (id prefix, is a FAQ, sections)
    for path in sorted(glob.glob(os.path.join(zsh_dir, "FAQ0*.html"))):
        pages.append(("zshfaq" + os.path.basename(path)[3:5], True, page_sections(path)))
    pages.append(("xtermfaq", True, page_sections(xterm_faq)))
    for path in sorted(glob.glob(os.path.join(zsh_dir, "*.html"))):
        name = os.path.basename(path)
        if name.startswith("FAQ") or SKIP_PAGES.search(name):
            continue
        pages.append(("zsh-" + name[:-5], False, page_sections(path)))
    headings = {norm(s["title"]) for _, _, secs in pages for s in secs}
    corpus, queries, qrels = [], [], []
    for prefix, is_faq, secs in pages:
        for i, s in enumerate(secs):
            text = body(s, headings)
            if len(text.split()) < MIN_WORDS:
                continue
            cid = f"{prefix}-{i}"
            title = NUMBER.sub("", s["title"]).strip()
            corpus.append({"_id": cid, "title": title, "text": text})
            if is_faq and title.endswith("?"):
                queries.append({"_id": "q-" + cid, "text": title})
                qrels.append(("q-" + cid, cid))
    write_beir(out_dir, corpus, queries, qrels)
    print(f"{out_dir}: {len(corpus)} sections, {len(queries)} questions")


if __name__ == "__main__":
    main()
