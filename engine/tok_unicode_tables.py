#!/usr/bin/env python3
"""tok_unicode_tables.py -- writes engine/tok_unicode_tables.c, the Unicode
data of the tokenizer, so that it does what the Hugging Face `tokenizers`
library does.  That library is not one Unicode version:

  * its NFC normalizer (crate unicode-normalization-alignments) knows
    Unicode 9.0: characters assigned later have combining class 0 and no
    decomposition;
  * its regex engine, Oniguruma (Rust crate onig), knows Unicode 16.0.0
    (check_gc and check_scripts below confirm it code point by code point),
    while the PCRE2 that mkad links (10.42 in Debian 12) knows 14.0.0.

Sources (pinned; a different version is refused):
  * unicodedata2 16.0.0 (PyPI): General_Category, combining classes and
    decompositions of Unicode 16.0.0;
  * regex 2024.11.6 (PyPI), whose tables are Unicode 16.0.0: the Script
    property and the names of the scripts (long names and ISO 15924 codes),
    the binary properties (Alphabetic, White_Space, Emoji, Word, ...) and
    their names, each kept only where Oniguruma agrees on every code point;
  * Python 3's own unicodedata (14.0.0 in Python 3.11, the version of
    PCRE2 10.42's tables): the base that the "changes" table patches;
  * tokenizers 0.23.3 (PyPI), asked which characters its NFC does not know
    and checked to agree with unicodedata2 on every general category.

    pip install unicodedata2==16.0.0 tokenizers==0.23.3
    pip install --target /tmp/regex16 regex==2024.11.6   # beside a newer regex
    PYTHONPATH=/tmp/regex16 python3 engine/tok_unicode_tables.py   # rewrites engine/tok_unicode_tables.c
    python3 engine/tok_unicode_tables.py --check    # only verifies the sources agree
"""
import argparse
import os
import sys
import unicodedata as base_ud

import regex
import regex._regex_core
import unicodedata2 as ud
import tokenizers
from tokenizers import normalizers, pre_tokenizers, Regex

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "tok_unicode_tables.c")
UNICODE = "16.0.0"
BASE = "14.0.0"
TOKENIZERS = "0.23.3"
REGEX = "2024.11.6"
# Index order of the general categories (tok_priv.h: TOK_GC_*).
GC = ["Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf",
      "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co", "Cn"]


def members(prop, sep):
    """Code points that Oniguruma (through tokenizers) matches with \\p{prop}."""
    sp = pre_tokenizers.Split(Regex(r"\p{%s}" % prop), "isolated")
    mem = bytearray(0x110000)
    for lo in range(0, 0x110000, 4096):
        chars = [chr(c) for c in range(lo, min(lo + 4096, 0x110000)) if not (0xD800 <= c < 0xE000) and chr(c) != sep]
        for piece, _ in sp.pre_tokenize_str(sep.join(chars)):
            if sep not in piece:
                for ch in piece:
                    mem[ord(ch)] = 1
    return mem


def check_gc():
    """Every general category as Oniguruma matches it equals unicodedata2's."""
    for g in GC:
        if g == "Cs":
            continue  # surrogates are not text
        sep = "a" if g[0] == "C" else "\x00"
        mem = members(g, sep)
        for cp in range(0x110000):
            if 0xD800 <= cp < 0xE000 or chr(cp) == sep:
                continue
            if bool(mem[cp]) != (ud.category(chr(cp)) == g):
                sys.exit("U+%04X: \\p{%s} in tokenizers %s disagrees with unicodedata2 %s (%s)"
                         % (cp, g, tokenizers.__version__, ud.unidata_version, ud.category(chr(cp))))


def onig_accepts(prop):
    try:
        pre_tokenizers.Split(Regex(r"\p{%s}" % prop), "isolated")
        return True
    except Exception:
        return False


def scripts():
    """[(script names, [(first, last)...])] for every script but Unknown:
    the names that both regex and Oniguruma know, lower case without
    separators, as Oniguruma compares them."""
    names = {}
    for name, idx in regex._regex_core.PROPERTIES["SCRIPT"][1].items():
        if onig_accepts(name):
            names.setdefault(idx, []).append(name.lower())
    parts = [(0, "".join(map(chr, range(0, 0xD800)))), (0xE000, "".join(map(chr, range(0xE000, 0x110000))))]
    out = []
    for idx in sorted(names):
        if "unknown" in names[idx]:
            continue
        key = max(names[idx], key=len)
        runs = [(base + m.start(), base + m.end() - 1)
                for base, text in parts for m in regex.finditer(r"\p{Script=%s}+" % key, text)]
        out.append((sorted(names[idx]), runs))
    return out


def binary_properties():
    """[(names, runs)] for every binary property that regex and Oniguruma
    both know by a name and that they agree on, code point by code point;
    and the names of those on which they disagree (left out: refused)."""
    props = {}
    for name, (pid, values) in regex._regex_core.PROPERTIES.items():
        if not ({"Y", "N"} <= set(values) and onig_accepts(name)):
            continue
        if name.lower() in ("any", "assigned"):  # General_Category sets in mkad
            continue
        props.setdefault(pid, []).append(name.lower())
    parts = [(0, "".join(map(chr, range(0, 0xD800)))), (0xE000, "".join(map(chr, range(0xE000, 0x110000))))]
    out, dropped = [], []
    for pid in sorted(props):
        names = sorted(props[pid])
        key = max(names, key=len)
        runs = [(base + m.start(), base + m.end() - 1)
                for base, text in parts for m in regex.finditer(r"\p{%s}+" % key, text)]
        want = bytearray(0x110000)
        for lo, hi in runs:
            want[lo:hi + 1] = b"\x01" * (hi + 1 - lo)
        sep = next(ch for ch in "\x00a!" if not want[ord(ch)])
        mem = members(key, sep)
        same = all(mem[cp] == want[cp] for cp in range(0x110000) if not (0xD800 <= cp < 0xE000) and chr(cp) != sep)
        (out if same else dropped).append((names, runs) if same else key)
    return out, dropped


def check_scripts(scs):
    """Every script as Oniguruma matches it (\p{Name}) equals regex's Script."""
    for names, runs in scs:
        mem = members(names[0], "\x00" if names[0] not in ("common", "zyyy") else "a")
        want = bytearray(0x110000)
        for lo, hi in runs:
            want[lo:hi + 1] = b"\x01" * (hi + 1 - lo)
        for cp in range(1, 0x110000):
            if 0xD800 <= cp < 0xE000 or cp == ord("a"):
                continue
            if mem[cp] != want[cp]:
                sys.exit("U+%04X: \\p{%s} in tokenizers %s disagrees with regex %s" % (cp, names[0], tokenizers.__version__, REGEX))


def hf_nfc_unknown():
    """Code points whose combining class or decomposition the HF NFC does
    not know (assigned after its Unicode version)."""
    nfc = normalizers.NFC().normalize_str
    no_ccc, no_dec = set(), set()
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000:
            continue
        c = chr(cp)
        k = ud.combining(c)
        if k and not ud.decomposition(c):
            # put a mark of a lower class after it: HF reorders only if it knows c
            s, exp = ("q" + c + "\u0334", "q\u0334" + c) if k > 1 else ("q\u0301" + c, "q" + c + "\u0301")
            r = nfc(s)
            if r == s:
                no_ccc.add(cp)
            elif r != exp:
                sys.exit("unexpected NFC of U+%04X: %r" % (cp, r))
        d = ud.decomposition(c)
        if d and not d.startswith("<"):
            nfd = ud.normalize("NFD", c)
            if (nfc(c), nfc(nfd)) != (ud.normalize("NFC", c), ud.normalize("NFC", nfd)):
                no_dec.add(cp)
                if k:
                    no_ccc.add(cp)
    return no_ccc, no_dec


def runs(values):
    """(first, last, value) runs of equal values over 0..0x10FFFF."""
    out = []
    for cp, v in enumerate(values):
        if out and out[-1][2] == v and out[-1][1] == cp - 1:
            out[-1][1] = cp
        else:
            out.append([cp, cp, v])
    return out


def wrap(items, width=100):
    lines, cur = [], "    "
    for it in items:
        if len(cur) + len(it) > width:
            lines.append(cur.rstrip())
            cur = "    "
        cur += it
    if cur.strip():
        lines.append(cur.rstrip())
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="verify the sources, write nothing")
    ap.add_argument("--out", default=OUT)
    a = ap.parse_args()
    if ud.unidata_version != UNICODE:
        sys.exit("needs unicodedata2==%s (pip install unicodedata2==%s), this is %s" % (UNICODE, UNICODE, ud.unidata_version))
    if base_ud.unidata_version != BASE:
        sys.exit("needs Python's own Unicode %s (Python 3.11), this is %s" % (BASE, base_ud.unidata_version))
    if regex.__version__ != "2.5.148" or ud.category(chr(0x10940)) != "Cn" or regex.match(r"\p{Assigned}", chr(0x10940)):
        sys.exit("needs regex==%s (Unicode %s; pip install --target DIR regex==%s, PYTHONPATH=DIR), this is %s"
                 % (REGEX, UNICODE, REGEX, regex.__version__))
    if tokenizers.__version__ != TOKENIZERS:
        sys.exit("needs tokenizers==%s, this is %s" % (TOKENIZERS, tokenizers.__version__))
    check_gc()
    scs = scripts()
    check_scripts(scs)
    bins, dropped = binary_properties()
    if a.check:
        print("unicodedata2 %s and regex %s agree with tokenizers %s on every general category and script, "
              "and on %d binary properties (not on %s)" % (UNICODE, REGEX, TOKENIZERS, len(bins), " ".join(dropped)))
        return
    no_ccc, no_dec = hf_nfc_unknown()

    ccc = [r for r in runs([0 if cp in no_ccc else ud.combining(chr(cp)) for cp in range(0x110000)]) if r[2]]
    dec = []  # (cp, first, second or 0, primary composite?)
    for cp in range(0x110000):
        if 0xD800 <= cp < 0xE000 or cp in no_dec:
            continue
        d = ud.decomposition(chr(cp))
        if not d or d.startswith("<"):
            continue
        parts = [int(x, 16) for x in d.split()]
        assert 1 <= len(parts) <= 2
        primary = len(parts) == 2 and ud.normalize("NFC", ud.normalize("NFD", chr(cp))) == chr(cp) \
            and ud.combining(chr(parts[0])) == 0
        dec.append((cp, parts[0], parts[1] if len(parts) == 2 else 0, 1 if primary else 0))

    gc_new = [GC.index(ud.category(chr(cp))) for cp in range(0x110000)]
    gc_old = [GC.index(base_ud.category(chr(cp))) for cp in range(0x110000)]
    gc_runs = [r for r in runs(gc_new) if r[2] != GC.index("Cn")]
    changes = [r for r in runs([(o << 8 | n) if o != n else -1 for o, n in zip(gc_old, gc_new)]) if r[2] >= 0]

    L = []
    L.append("/* tok_unicode_tables.c -- GENERATED by engine/tok_unicode_tables.py; do not edit.")
    L.append(" * Sources: unicodedata2 %s, regex %s, Python unicodedata %s, tokenizers %s. */"
             % (ud.unidata_version, REGEX, base_ud.unidata_version, tokenizers.__version__))
    L.append('#include "tok_priv.h"')
    L.append("")
    L.append('const char tok_uc_version[] = "%s";      /* the regex tables (Oniguruma in tokenizers) */' % UNICODE)
    L.append('const char tok_uc_base_version[] = "%s"; /* what tok_uc_gc_changes patches (PCRE2 10.42) */' % BASE)
    L.append("")
    L.append("/* Canonical combining classes as the HF NFC applies them: %d characters newer"
             % len(no_ccc | no_dec))
    L.append(" * than its tables are left out (class 0, no decomposition). */")
    L.append("const uint32_t tok_uc_ccc[][3] = { /* first, last, canonical combining class */")
    L += wrap(["{0x%X,0x%X,%d}," % tuple(r) for r in ccc])
    L.append("};")
    L.append("const size_t tok_uc_n_ccc = sizeof tok_uc_ccc / sizeof tok_uc_ccc[0];")
    L.append("")
    L.append("const uint32_t tok_uc_decomp[][4] = { /* code point, first, second (0: singleton), primary composite */")
    L += wrap(["{0x%X,0x%X,0x%X,%d}," % e for e in dec])
    L.append("};")
    L.append("const size_t tok_uc_n_decomp = sizeof tok_uc_decomp / sizeof tok_uc_decomp[0];")
    L.append("")
    L.append("/* General_Category of Unicode %s: runs (first, last, TOK_GC_*) in order;" % UNICODE)
    L.append(" * code points in no run are Cn (unassigned). */")
    L.append("const uint32_t tok_uc_gc[][3] = {")
    L += wrap(["{0x%X,0x%X,%d}," % tuple(r) for r in gc_runs])
    L.append("};")
    L.append("const size_t tok_uc_n_gc = sizeof tok_uc_gc / sizeof tok_uc_gc[0];")
    L.append("")
    L.append("/* Code points whose General_Category differs between Unicode %s and %s:" % (BASE, UNICODE))
    L.append(" * (first, last, category in %s, category in %s). */" % (BASE, UNICODE))
    L.append("const uint32_t tok_uc_gc_changes[][4] = {")
    L += wrap(["{0x%X,0x%X,%d,%d}," % (lo, hi, v >> 8, v & 255) for lo, hi, v in changes])
    L.append("};")
    L.append("const size_t tok_uc_n_gc_changes = sizeof tok_uc_gc_changes / sizeof tok_uc_gc_changes[0];")
    L.append("")
    L.append("/* Script of Unicode %s (regex %s): the runs of each script (first, last," % (UNICODE, REGEX))
    L.append(" * script index) in code point order; code points in no run are Unknown. */")
    allruns = sorted((lo, hi, i) for i, (_, runs) in enumerate(scs) for lo, hi in runs)
    L.append("const uint32_t tok_uc_script[][3] = {")
    L += wrap(["{0x%X,0x%X,%d}," % r for r in allruns])
    L.append("};")
    L.append("const size_t tok_uc_n_script = sizeof tok_uc_script / sizeof tok_uc_script[0];")
    L.append("/* The names Oniguruma accepts for each script, lower case without '_' '-' ' ';")
    L.append(' * index = position in tok_uc_script; "unknown" and "zzzz" are the rest. */')
    L.append("const tok_uc_name tok_uc_script_names[] = {")
    L += wrap(['{"%s",%d},' % (n, i) for i, (names, _) in enumerate(scs) for n in names])
    L.append("};")
    L.append("const size_t tok_uc_n_script_names = sizeof tok_uc_script_names / sizeof tok_uc_script_names[0];")
    L.append("")
    L.append("/* Binary properties of Unicode %s (regex %s) that Oniguruma has the same:" % (UNICODE, REGEX))
    L.append(" * runs (first, last, property index) ordered by property, then code point.")
    for k in range(0, len(dropped), 8):
        L.append(" * %s %s" % ("Left out (they differ between the two, so mkad refuses them):" if k == 0 else "  ",
                              ", ".join(dropped[k:k + 8])))
    L.append(" */")
    binruns = [(lo, hi, i) for i, (_, runs) in enumerate(bins) for lo, hi in runs]
    L.append("const uint32_t tok_uc_binary[][3] = {")
    L += wrap(["{0x%X,0x%X,%d}," % r for r in binruns])
    L.append("};")
    L.append("const size_t tok_uc_n_binary = sizeof tok_uc_binary / sizeof tok_uc_binary[0];")
    L.append("const tok_uc_name tok_uc_binary_names[] = {")
    L += wrap(['{"%s",%d},' % (n, i) for i, (names, _) in enumerate(bins) for n in names])
    L.append("};")
    L.append("const size_t tok_uc_n_binary_names = sizeof tok_uc_binary_names / sizeof tok_uc_binary_names[0];")
    with open(a.out, "w") as f:
        f.write("\n".join(L) + "\n")
    print("wrote %s: %d ccc ranges, %d decompositions, %d category runs, %d changes since %s, %d scripts in %d runs, "
          "%d binary properties in %d runs (%d left out: %s)"
          % (a.out, len(ccc), len(dec), len(gc_runs), len(changes), BASE, len(scs), len(allruns), len(bins), len(binruns),
             len(dropped), " ".join(dropped)))


if __name__ == "__main__":
    main()
