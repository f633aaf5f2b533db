"""Pure-Python copy of the PTB tokenization that pycocoevalcap applies to captions before scoring.

Reproduces Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` plus pycocoevalcap's punctuation removal.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Hashable

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "tokenize_captions"]

# Tokens pycocoevalcap drops after tokenizing (its list is uppercase, so the lowercased -lrb- etc. stay).
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"])

# Characters the Java tokenizer treats as line breaks; pycocoevalcap would misalign captions containing them.
_LINE_BREAKS = re.compile("[\r\x0b\x0c\u2028\u2029]")


def _bmp_class(predicate: Callable[[str], bool]) -> str:
    """Character-class body (ranges) of the BMP characters satisfying ``predicate``."""
    ranges, start, prev = [], None, None
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF or not predicate(chr(code)):
            continue
        if start is not None and code == prev + 1:
            prev = code
            continue
        if start is not None:
            ranges.append((start, prev))
        start = prev = code
    ranges.append((start, prev))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _ci(*words: str) -> str:
    """Case-insensitive alternation of literal words (the Java lexer is caseless outside character classes)."""
    return "(?i:" + "|".join(words) + ")"


# ---------------------------------------------------------------------------------------------------------------
# Character classes and macros of the lexer (names follow the Java PTBLexer.flex).
# ---------------------------------------------------------------------------------------------------------------
_SP = " \t\u00a0\u2000-\u200a\u3000"
_NL = "\r\n\u2028\u2029\x0b\x0c\x85"
SPACE = f"[{_SP}]"
SPACES = f"{SPACE}+"
SPACENL = f"[{_SP}{_NL}]"
_LETTER_EXTRA = (
    "\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f\u0370-\u037d\u0384\u0385\u03cf\u03f6"
    "\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4"
    "\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f"
    "\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963"
    "\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f"
    "\u0a81-\u0a83\u0abc-\u0acf\u0b82\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44"
    "\u0d46-\u0d48\u0e30-\u0e3a\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd"
)
_ALPHA = _bmp_class(str.isalpha)  # Java Character.isLetter, restricted to the BMP as in JFlex 1.4
_DIGITS = _bmp_class(str.isdecimal)  # Java Character.isDigit
ALPHA = f"[{_ALPHA}]"
ALNUM = f"[{_ALPHA}{_DIGITS}]"
SPLET = "&[aeiouAEIOU]" + _ci("acute", "grave", "uml") + ";"
LETTER = f"(?:[{_ALPHA}{_LETTER_EXTRA}]|{SPLET})"
DIGIT = f"[{_DIGITS}\u07c0-\u07c9]"
UPPER = f"[{_bmp_class(str.isupper)}]"
SGML = (
    "<(?:[!?][A-Za-z-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9:.-]*"
    "(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*[ ]*=[ ]*['\"][^\r\n'\"]*['\"]|[A-Za-z][A-Za-z0-9_:.-]*|['\"][^\r\n'\"]*['\"])"
    "|[ ]*/)*[ ]*)>"
)
SPMDASH = "&" + _ci("mdash", "ndash", "md") + ";|[\u0096\u0097\u2013\u2014\u2015]"
SPAMP = _ci("&amp;")
SPPUNC = "&(?:" + _ci("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq") + "|#[0-9]+);"
SENTEND = f"{SPACENL}(?:{SPACENL}|{UPPER}|{SGML})"
DATE = f"{DIGIT}{{1,2}}[-/]{DIGIT}{{1,2}}[-/]{DIGIT}{{2,4}}"
NUM = f"{DIGIT}+(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)*|{DIGIT}*(?:[.,\u00ad\u066b\u066c]{DIGIT}+)+"
NUMBER = f"[-+]?(?:{NUM})"
SUBSUPNUM = "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"
FRAC = f"(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\\\?/|\u2044){DIGIT}{{1,4}}"
FRAC2 = "[\u00bc\u00bd\u00be\u2153-\u215e]"
DOLSIGN = "[A-Z]*\\$|#"
DOLSIGN2 = "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"
WORD = f"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"
APOS = "['\u0092\u2019]|" + _ci("&apos;")
APOSETCETERA = f"(?:{APOS}|[`\u0091\u2018\u201b])"
APOS = f"(?:{APOS})"
HYPHEN = "[-_\u058a\u2010\u2011]"
THING = (
    f"(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+"
    f"(?:{HYPHEN}(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+)*"
)
THINGA = f"[A-Z]+(?:(?:[+&]|{SPAMP})[A-Z]+)+"
THING3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
ACRO = "[A-Za-z](?:\\.[A-Za-z])+|" + _ci("canada", "sino", "korean", "eu", "japan", "non") + _ci("-u\\.s")
ACRO += "|" + _ci("u\\.s\\.-") + _ci("u\\.s\\.s\\.r", "u\\.k")
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:[A-Za-z0-9\u00ad]+|(?:{ACRO})\\.))+"
REDAUX = f"{APOS}(?:[msdMSD]|{_ci('re', 've', 'll')})"
SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = f"{_ci('n')}{APOSETCETERA}{_ci('t')}"
APOWORD = "|".join(
    [
        f"{APOS}{_ci('n')}{APOS}?",
        f"[lLdDjJ]{APOS}",
        f"{_ci('dunkin')}{APOS}",
        f"{_ci('somethin')}{APOS}",
        f"{_ci('ol')}{APOS}",
        f"{APOS}{_ci('em')}",
        f"[A-HJ-XZn]{APOSETCETERA}{ALPHA}{{2,}}",
        f"{APOS}[2-9]0{_ci('s')}",
        f"{APOS}{_ci('till', 'til')}",
        f"{ALPHA}+(?<=[aeiouyAEIOUY]){APOSETCETERA}[aeiouA-Z]{ALPHA}*",
        f"{APOS}{_ci('cause')}",
        _ci("cont'd\\.?", "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l"),
    ]
)
APOWORD2 = f"{_ci('y')}{APOS}"
FULLURL = _ci("https?://") + "[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-]"
LIKELYURL = (
    "(?:" + _ci("www\\.") + "(?:[^ \t\n\f\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}"
    "|(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+" + _ci("com", "net", "org", "edu") + ")"
    "(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"
)
EMAIL = (
    "[a-zA-Z0-9][^ \t\n\f\r\"<>|()\u00a0]*@(?:[^ \t\n\f\r\"<>|().\u00a0]+\\.)*[^ \t\n\f\r\"<>|().\u00a0]+"
)
TWITTER = f"@[a-zA-Z_][a-zA-Z_0-9]*|#{WORD}"
ABMONTH = ["jan", "feb", "mar", "apr", "jun", "jul", "aug", "sept", "sep", "oct", "nov", "dec"]
ABDAYS = ["mon", "tues", "tue", "wed", "thurs", "thu", "fri"]
ABSTATE = (
    _ci("ala", "ariz", "az", "calif", "colo", "conn", "ct", "dak", "fla", "ga", "ind", "kans", "kan", "ky", "md")
    + "|"
    + _ci("mich", "minn", "mo", "mont", "neb", "nev", "okla", "penn", "tenn", "va", "vt", "wisc", "wis", "wyo")
    + "|A"
    + _ci("rk")
    + "|D"
    + _ci("el")
    + "|I"
    + _ci("ll")
    + "|L"
    + _ci("a")
    + "|M"
    + _ci("ass", "iss")
    + "|O"
    + _ci("re")
    + "|P"
    + _ci("a")
    + "|T"
    + _ci("ex")
    + "|W"
    + _ci("ash")
)
ABCOMP = _ci("inc", "cos", "co", "corp", "ppt[ye]s", "pt[ye]s", "ppt[ye]", "pt[ye]", "ltd", "plc", "rt", "bancorp")
ABCOMP += "|" + _ci("bhd", "assn", "univ", "intl", "sys")
ABBREV1 = (
    "(?:"
    + _ci(*ABMONTH, *ABDAYS)
    + f"|{ABSTATE}|{ABCOMP}|"
    + _ci("tel", "est", "ext", "sq", "jr", "sr", "bros", "ed\\.d", "ph\\.d", "blvd", "rd", "esq", "etc", "al", "seq")
    + "|"
    + _ci("bldg")
    + ")\\."
)
ABTITLE = _ci(
    "mrs", "mr", "ms", "miss", "drs", "dr", "profs", "prof", "sens", "sen", "reps", "rep", "attys", "atty", "lt",
    "col", "gen", "messrs", "govs", "gov", "adm", "rev", "maj", "sgt", "cpl", "pvt", "capt", "ste", "st", "ave",
    "pres", "lieut", "hon", "brig", "comdr", "cmdr", "pfc", "spc", "supts", "supt", "det", "mt", "ft", "adj", "adv",
    "asst", "assoc", "ens", "insp", "mlle", "mme", "msgr", "sfc",
)  # fmt: skip
ABCOMP2 = _ci("invt", "elec", "natl", "mfg", "mtg", "dept")
ABBREV4 = f"(?:[A-Za-z]|{ABTITLE}|{_ci('vs', 'alex', 'wm', 'jos', 'cie', 'a\\.k\\.a', 'cf', 'treas', 'ph')}|v|{ACRO}|{ABCOMP2})"
ABBREV2 = f"{ABBREV4}\\."
ACRONYM = f"(?:{ACRO})\\."
ABBREV3 = _ci("ca", "figs", "fig", "prop", "nos", "no", "art", "bldg", "pp", "op") + "\\."
ACRONYM_FOLLOWERS = (
    "About|According|Additionally|After|An|A|As|At|But|Did|During|Earlier|He|Her|Here|However|How|If|In|It|Last|"
    "Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|"
    "We|When|While|What|Who|Why|Yet|You"
)
PHONE = (
    "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])[0-9]{3,4}[- \u00a0]?[0-9]{3,5}"
    "|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}"
)
HYPHENS = "-+"
LDOTS = "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]"
FNMARKS = "@+|#+|_+"
ASTS = "\\*+|(?:\\\\\\*){1,3}"
INSENTP = "[,;:\u3001]"
QUOTES = (
    f"{APOS}|''|[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]{{1,2}}"
)
DBLQUOT = '"|' + _ci("&quot;")
TBSPEC = "-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\\.D\\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls|Cap{A}n|c{A}est"
TBSPEC = "(?i:-(?:rrb|lrb|rcb|lcb|rsb|lsb)-|c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls)"
TBSPEC += f"|{_ci('cap')}{APOS}{_ci('n')}|{_ci('c')}{APOS}{_ci('est')}"
TBSPEC2 = f"{APOS}[0-9][0-9]"
SMILEY = "[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]"
ASIANSMILEY = (
    "[\\^x=~<>]\\.\\[\\^x=~<>]|[-\\^x=~<>']_[-\\^x=~<>']|\\([-\\^x=~<>'][_.]?[-\\^x=~<>']\\)"
    "|\\([\\^x=~<>']-[\\^x=~<>'`]\\)"
)
MISCSYMBOL = (
    "[+%&~\\^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387\u05be\u05c0"
    "\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6\u07f7"
    "\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044\u207a-\u207f"
    "\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20\uff3b-\uff40"
    "\uff5b-\uff65]"
)
PROG_LANGS = _ci("c\\+\\+", "c#", "f#")
ASSIMILATIONS3 = _ci("cannot", "'twas")
ASSIMILATIONS2 = f"{APOS}{_ci('tis')}|" + _ci("gonna", "gotta", "lemme", "gimme", "wanna")


# ---------------------------------------------------------------------------------------------------------------
# Token normalizations done by the Java lexer's actions (ptb3Escaping defaults of CoreNLP 3.4.1).
# ---------------------------------------------------------------------------------------------------------------
_LATEX_QUOTES = [
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
]
_SINGLE_QUOTE = re.compile("&apos;|'")
_DOUBLE_QUOTE = re.compile('"|&quot;')
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_CURRENCY = [(re.compile("\u00a2"), "cents"), (re.compile("\u00a3"), "#"), (re.compile("[\u0080\u00a4\u20a0\u20ac]"), "$")]
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_AMP = re.compile("(?i:&amp;)")


def _quotes(tok: str, probably_left: bool) -> str:
    if probably_left:
        tok = _DOUBLE_QUOTE.sub("``", _SINGLE_QUOTE.sub("`", tok))
    else:
        tok = _DOUBLE_QUOTE.sub("''", _SINGLE_QUOTE.sub("'", tok))
    for pattern, repl in _LATEX_QUOTES:
        tok = pattern.sub(repl, tok)
    return tok


def _soft_hyphens(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _currency(tok: str) -> str:
    for pattern, repl in _CURRENCY:
        tok = pattern.sub(repl, tok)
    return tok


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


# An action gets the token text (the part before any trailing context) and returns (tokens, chars consumed).
Action = Callable[[str], tuple[list[str], int]]


def _keep(tok: str) -> tuple[list[str], int]:
    return [tok], len(tok)


def _mapped(fn: Callable[[str], str]) -> Action:
    return lambda tok: ([fn(tok)], len(tok))


def _pushback(n: int) -> Action:
    return lambda tok: ([tok[:-n]], len(tok) - n)


def _dup_period(tok: str) -> tuple[list[str], int]:
    """Abbreviation ending a sentence: the token keeps its period and a period token follows."""
    return [tok], len(tok) - 1


def _acronym(tok: str) -> tuple[list[str], int]:
    """Acronym before a sentence start: "I." -> "I" "."; "U.S." -> "U.S." "."."""
    if len(tok) == 2:
        return [tok[0]], 1
    return [tok], len(tok) - 1


def _skip(tok: str) -> tuple[list[str], int]:
    return [], len(tok)


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _dashes(tok: str) -> tuple[list[str], int]:
    return (["--"] if 3 <= len(tok) <= 4 else [tok]), len(tok)


def _followers() -> str:
    """Capitalized words after which an acronym's period also ends the sentence (first letter case-sensitive)."""
    words = ACRONYM_FOLLOWERS.split("|")
    return "(?:" + "|".join(w[0] + (_ci(w[1:]) if len(w) > 1 else "") for w in words) + ")"


# (name, first-character class, alternatives (token regex, trailing-context regex or None), action). The lexer picks
# the longest match (token plus trailing context); ties go to the earlier rule, as in JFlex.
_RULE_TABLE: list[tuple[str, str, list[tuple[str, str | None]], Action]] = [
    ("PROG_LANGS", "cCfF", [(PROG_LANGS, None)], _keep),
    ("ASSIMILATIONS3", "cC'", [(ASSIMILATIONS3, None)], _pushback(3)),
    ("ASSIMILATIONS2", "gGlLwW'\u0092\u2019&", [(ASSIMILATIONS2, None)], _pushback(2)),
    ("SGML", "<", [(SGML, None)], _mapped(_nbsp)),
    ("SPMDASH", "&\u0096\u0097\u2013\u2014\u2015", [(SPMDASH, None)], lambda t: (["--"], len(t))),
    ("SPAMP", "&", [(SPAMP, None)], lambda t: (["&"], len(t))),
    ("SPPUNC", "&", [(SPPUNC, None)], _keep),
    ("WORD/REDAUX", "LETTER", [(WORD, REDAUX)], _mapped(_soft_hyphens)),
    ("SWORD/SREDAUX", "A-Za-z\u00ad", [(SWORD, SREDAUX)], _mapped(_soft_hyphens)),
    ("WORD", "LETTER", [(WORD, None)], _mapped(_soft_hyphens)),
    ("APOWORD", "LETTER'\u0092\u2019&", [(alt, None) for alt in APOWORD.split("|(?=") if alt], _keep),
    ("APOWORD2", "yY", [(APOWORD2, ALPHA)], _keep),
    ("FULLURL", "hH", [(FULLURL, None)], _keep),
    ("LIKELYURL", "ANY", [(alt, None) for alt in [LIKELYURL]], _keep),
    ("EMAIL", "a-zA-Z0-9", [(EMAIL, None)], _keep),
    ("TWITTER", "@#", [(TWITTER, None)], _keep),
    ("REDAUX/NONLETTER", "'\u0092\u2019&", [(REDAUX, "[^A-Za-z]")], _mapped(lambda t: _quotes(t, False))),
    ("SREDAUX", "nN", [(SREDAUX, None)], _mapped(lambda t: _quotes(t, False))),
    ("DATE", "DIGIT", [(DATE, None)], _keep),
    ("NUMBER", "DIGIT-+.,\u00ad\u066b\u066c", [(NUMBER, None)], _mapped(_soft_hyphens)),
    ("SUBSUPNUM", "\u207a\u207b\u208a\u208b\u2070\u00b9\u00b2\u00b3\u2074-\u2079\u2080-\u2089", [(SUBSUPNUM, None)], _keep),
    ("FRAC", "DIGIT", [(FRAC, None)], _mapped(_nbsp)),
    ("FRAC2", FRAC2[1:-1], [(FRAC2, None)], _mapped(lambda t: _FRACTIONS.get(t, t))),
    ("TBSPEC", "ANY", [(TBSPEC, None)], _mapped(lambda t: _AMP.sub("&", t))),
    ("THING3", "A-Za-z0-9", [(THING3, None)], _keep),
    ("DOLSIGN", "A-Z$#", [(DOLSIGN, None)], _keep),
    ("DOLSIGN2", DOLSIGN2[1:-1], [(DOLSIGN2, None)], _mapped(_currency)),
    ("ACRONYM/FOLLOWER", "A-Za-z", [(ACRONYM, f"{SPACENL}+{_followers()}(?:{SPACENL}|[?!])")], _acronym),
    ("ABBREV3/DIGIT", "a-zA-Z", [(ABBREV3, f"{SPACENL}?{DIGIT}")], _keep),
    ("ABBREV1/SENTEND", "a-zA-Z", [(ABBREV1, SENTEND)], _dup_period),
    ("ABBREV1/ANY2", "a-zA-Z", [(ABBREV1, "(?s:..)")], _keep),
    ("ABBREV1", "a-zA-Z", [(ABBREV1, None)], _dup_period),
    ("ABBREV2", "a-zA-Z", [(ABBREV2, None)], _keep),
    ("ABBREV4/SPACE", "a-zA-Z", [(ABBREV4, SPACE)], _keep),
    ("ACRO/SPACENL", "a-zA-Z", [(f"(?:{ACRO})", SPACENL)], _keep),
    ("TBSPEC2/SPACENL", "'\u0092\u2019&", [(TBSPEC2, SPACENL)], _keep),
    ("WORD./INSENTP", "LETTER", [(WORD + "\\.", INSENTP)], _mapped(_soft_hyphens)),
    ("PHONE", "0-9(+", [(alt, None) for alt in PHONE.split("|(?:(?:")], _mapped(lambda t: _parens(_nbsp(t)))),
    ("DBLQUOT/ALNUM", '"&', [(DBLQUOT, "[A-Za-z0-9$]")], _mapped(lambda t: _quotes(t, True))),
    ("DBLQUOT", '"&', [(DBLQUOT, None)], _mapped(lambda t: _quotes(t, False))),
    ("DEL", "\x7f", [("\x7f", None)], _skip),
    ("LESSTHAN", "<&", [("<|" + _ci("&lt;"), None)], lambda t: (["<"], len(t))),
    ("GREATERTHAN", ">&", [(">|" + _ci("&gt;"), None)], lambda t: ([">"], len(t))),
    ("SMILEY", "<>:;=", [(SMILEY, "[^A-Za-z0-9]")], _mapped(_parens)),
    ("ASIANSMILEY", "^x=~<>'(_-", [(ASIANSMILEY, None)], _mapped(_parens)),
    ("BRACKET", "(){}[]", [("[(){}\\[\\]]", None)], _mapped(_BRACKETS.__getitem__)),
    ("HYPHENS", "-", [(HYPHENS, None)], _dashes),
    ("LDOTS", ".\u0085\u2026", [(LDOTS, None)], lambda t: (["..."], len(t))),
    ("FNMARKS", "@#_", [(FNMARKS, None)], _keep),
    ("ASTS", "*\\\\", [(ASTS, None)], _keep),
    ("INSENTP", ",;:\u3001", [(INSENTP, None)], _keep),
    ("QUESTION", "?!", [("[?!]+", None)], _keep),
    ("PERIOD", ".\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002",
     [("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None)], _keep),  # fmt: skip
    ("EQUALS", "=", [("=", None)], _keep),
    ("SLASH", "/", [("/", None)], _keep),
    ("HTHING./INSENTP", "A-Za-z0-9", [(HTHING + "\\.", INSENTP)], _mapped(_soft_hyphens)),
    ("HTHING", "A-Za-z0-9", [(HTHING, None)], _mapped(_soft_hyphens)),
    ("THING./INSENTP", "ALNUM", [(THING + "\\.", INSENTP)], _keep),
    ("THING", "ALNUM", [(THING, None)], _keep),
    ("THINGA./INSENTP", "A-Z", [(THINGA + "\\.", INSENTP)], _mapped(lambda t: _AMP.sub("&", t))),
    ("THINGA", "A-Z", [(THINGA, None)], _mapped(lambda t: _AMP.sub("&", t))),
    ("LEFTQUOTE", "'", [("'", "[A-Za-z][^ \t\n\r\u00a0]")], _mapped(lambda t: _quotes(t, True))),
    ("REDAUX", "'\u0092\u2019&", [(REDAUX, None)], _mapped(lambda t: _quotes(t, False))),
    ("QUOTES", "ANY", [(QUOTES, None)], _mapped(lambda t: _quotes(t, False))),
    ("FAKEDUCKFEET", "<>", [("<<|>>", None)], _keep),
    ("MISCSYMBOL", "ANY", [(MISCSYMBOL, None)], _keep),
    ("IGNORED", "ANY", [(f"\x00|{SPACES}|[\u200b\u200e\u200f\ufeff]|[{_NL}]|" + _ci("&nbsp;"), None)], _skip),
    ("UNTOKENIZABLE", "ANY", [("(?s:.)", None)], _skip),
]
