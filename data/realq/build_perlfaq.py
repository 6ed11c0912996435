#!/usr/bin/env python3
"""Build the 'perlfaq' BEIR-layout retrieval test set (Python standard library only).

Source: Debian bookworm package perl-doc 5.36.0 (`apt-get download perl-doc && dpkg -x
perl-doc_*.deb perl-doc`), POD files under usr/share/perl/5.36.0/pod. Licence: the same terms
as Perl itself (Artistic License or GPL-1+), see LICENSE.md beside the set.

Queries = every `=head2` heading of perlfaq1..perlfaq9 that ends in '?' (the questions Perl
          users asked often enough to be answered in the FAQ), POD codes rendered as text.
Qrels   = each question -> its own answer section (one judged section per question).
Corpus  = the answer sections (heading removed, like every section) plus the sections of the
          core Perl manuals a user would search beside the FAQ (perlfunc split per function,
          the others at every =head1/=head2/=head3), sections under 5 words dropped.

Links to a FAQ answer are written L<perlfaqN/"Question text?"> or L<"Question text?">; the
question is dropped (kept: 'perlfaqN' or 'the FAQ') because otherwise the query text would appear verbatim in the
*referring* section and that section would be a second, unjudged answer.

Usage: build_perlfaq.py POD_DIR OUT_DIR
"""
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from beir_files import write_beir  # noqa: E402

FAQS = [f"perlfaq{i}" for i in range(1, 10)]
MANUALS = [
    "perlintro", "perlsyn", "perldata", "perlop", "perlsub", "perlfunc", "perlvar", "perlrun",
    "perlre", "perlretut", "perlrequick", "perlrecharclass", "perlrebackslash", "perlreftut",
    "perlref", "perldsc", "perllol", "perlopentut", "perlpacktut", "perlstyle", "perltrap",
    "perldebug", "perlport", "perlsec", "perlmod", "perlmodinstall", "perlnewmod", "perlobj",
    "perlootut", "perlipc", "perlfork", "perlthrtut", "perlunicode", "perluniintro",
    "perlunifaq", "perlform", "perlperf", "perllocale", "perlsub", "perlnumber", "perlcheat",
]
MIN_WORDS = 5


ESCAPES = {"lt": "<", "gt": ">", "sol": "/", "verbar": "|", "quot": '"', "amp": "&"}


def code(letter, inner):
    """One POD formatting code with its (already rendered) content."""
    if letter in "XZ":
        return ""
    if letter == "E":
        return ESCAPES.get(inner, chr(int(inner)) if inner.isdigit() else "")
    if letter != "L":
        return inner
    if "|" in inner:
        return inner.split("|", 1)[0]
    m = re.fullmatch(r'([^/"]*)/?"?([^"]*\?)"?', inner.strip())
    if m:  # a link to a FAQ answer: its question is dropped (see the module doc)
        return m.group(1) or "the FAQ"
    m = re.fullmatch(r'([^/]*)/"?([^"]*)"?', inner)
    if m:
        return f"{m.group(2)} in {m.group(1)}" if m.group(1) else m.group(2)
    return inner.strip('"')


def render(text, i=0, close=None):
    """POD formatting codes -> plain text (nested codes and C<< >> delimiters included)."""
    out, n = [], len(text)
    while i < n:
        if close and text.startswith(close, i):
            return "".join(out), i + len(close)
        m = re.match(r"([A-Z])(<+)", text[i:])
        if m and (len(m.group(2)) == 1 or text[i + m.end():i + m.end() + 1].isspace()):
            letter, opening = m.group(1), m.group(2)
            end = ">" if len(opening) == 1 else " " + ">" * len(opening)
            if len(opening) > 1:
                j = text.find(end, i + m.end())
                if j < 0:
                    out.append(text[i]); i += 1; continue
                inner = render(text[i + m.end():j].strip())
                out.append(code(letter, inner))
                i = j + len(end)
            else:
                inner, i = render(text, i + m.end(), ">")
                out.append(code(letter, inner))
            continue
        out.append(text[i])
        i += 1
    return ("".join(out), i) if close else "".join(out)


def paragraphs(path):
    """POD paragraphs (command or text), skipping =begin/=end and =for blocks."""
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    skipping = False
    for para in re.split(r"\n\s*\n", raw):
        if not para.strip():
            continue
        if para.startswith("=begin"):
            skipping = True
            continue
        if para.startswith("=end"):
            skipping = False
            continue
        if skipping or para.startswith(("=for", "=pod", "=cut", "=encoding")):
            continue
        yield para


def squash(parts):
    return re.sub(r"\s+", " ", " ".join(parts)).strip()


def sections(path, split_items=False):
    """(heading, body) for each =head1..=head3 section; with `split_items`, each top-level
    =item of a list also starts a section (perlfunc's function entries)."""
    out = [("", [])]
    depth = 0
    for para in paragraphs(path):
        m = re.match(r"=(head[1-4]|over|back|item)\s*(.*)", para, flags=re.S)
        if not m:
            # Verbatim (indented) paragraphs are code: POD codes are not interpreted there.
            out[-1][1].append(para.strip() if para[:1].isspace() else render(para))
            continue
        cmd, arg = m.group(1), render(m.group(2)).strip()
        if cmd.startswith("head"):
            depth = 0
            out.append((arg, []))
        elif cmd == "over":
            depth += 1
        elif cmd == "back":
            depth = max(0, depth - 1)
        elif split_items and depth == 1:
            if out[-1][1]:  # a new entry; consecutive =items share one body
                out.append((arg, []))
        else:
            out[-1][1].append(arg)
    return [(h, squash(b)) for h, b in out]


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    pod_dir, out_dir = sys.argv[1], sys.argv[2]
    corpus, queries, qrels = [], [], []
    for name in FAQS:
        for i, (head, body) in enumerate(sections(os.path.join(pod_dir, name + ".pod"))):
            if head.upper() in ("NAME", "DESCRIPTION", "AUTHOR AND COPYRIGHT", "VERSION", ""):
                continue
            if len(body.split()) < MIN_WORDS:
                continue
            cid = f"{name}-{i}"
            corpus.append({"_id": cid, "title": head, "text": body})
            if head.endswith("?"):
                qid = f"q-{name}-{i}"
                queries.append({"_id": qid, "text": head})
                qrels.append((qid, cid))
    seen = set()
    for name in MANUALS:
        if name in seen:
            continue
        seen.add(name)
        for i, (head, body) in enumerate(
            sections(os.path.join(pod_dir, name + ".pod"), split_items=name == "perlfunc")
        ):
            if head.upper() in ("NAME", "AUTHOR", "AUTHORS", "SEE ALSO", "COPYRIGHT"):
                continue
            if len(body.split()) >= MIN_WORDS:
                corpus.append({"_id": f"{name}-{i}", "title": head, "text": body})
    write_beir(out_dir, corpus, queries, qrels)
    print(f"{out_dir}: {len(corpus)} sections, {len(queries)} questions")


if __name__ == "__main__":
    main()
