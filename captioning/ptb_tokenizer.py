"""Pure-Python copy of the PTB tokenization that pycocoevalcap applies to captions before scoring (no Java needed).

Reproduces Stanford CoreNLP 3.4.1 ``PTBTokenizer -preserveLines -lowerCase`` and pycocoevalcap's punctuation removal;
the rules below follow the published JFlex grammar, adjusted until they matched the jar on large test corpora.

Known differences from pycocoevalcap:
- Line breaks other than "\\n" inside a caption (\\r, \\v, \\f, U+2028, U+2029) are read as spaces; the Java
  tokenizer ends the line there, which shifts every later caption of pycocoevalcap's output by one.
- Letter and digit classes are the jar's (Unicode 6), rebuilt from Python 3.11's Unicode 14 database; Pythons with
  newer databases may treat letters added after Unicode 14 as letters where Java deletes them.
- Lowercasing is Java 17's; for a capital sigma next to combining marks and punctuation its final-form rule is
  matched approximately (one difference in 160,000 random strings of such characters).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Hashable, Iterable
from functools import lru_cache

__all__ = ["PUNCTUATIONS", "ptb_tokenize", "ptb_tokenize_each", "tokenize_captions"]

# Tokens pycocoevalcap drops after tokenizing (its list is uppercase, so the lowercased -lrb- etc. stay).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# Newlines in a caption become spaces, as in pycocoevalcap; so do the other line breaks of the Java tokenizer, which
# would otherwise shift pycocoevalcap's captions.
_LINE_BREAKS = re.compile("[\n\r\x0b\x0c\u2028\u2029]")


def _bmp_class(predicate: Callable[[str], bool]) -> str:
    """Character-class body (as ranges) of the BMP characters satisfying ``predicate``."""
    ranges: list[tuple[int, int]] = []
    for code in range(0x10000):
        if 0xD800 <= code <= 0xDFFF or not predicate(chr(code)):
            continue
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], code)
        else:
            ranges.append((code, code))
    return "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}" for a, b in ranges)


def _ci(*words: str) -> str:
    """Case-insensitive alternation of literals: the Java lexer is caseless except inside character classes."""
    return "(?i:" + "|".join(words) + ")"


def _ci_first(words: Iterable[str]) -> str:
    """Alternation of words whose first letter is matched case-sensitively (``[A]bout`` in the Java grammar)."""
    return "(?:" + "|".join(w[0] + (_ci(w[1:]) if len(w) > 1 else "") for w in words) + ")"


# ---------------------------------------------------------------------------------------------------------------
# Macros of the Java grammar (names follow PTBLexer.flex), written as Python regular expressions.
# ---------------------------------------------------------------------------------------------------------------
_SP = " \t\u00a0\u2000-\u200a\u3000"
_NL = "\r\n\u2028\u2029\x0b\x0c\x85"
SPACE = f"[{_SP}]"
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
# Letters and digits that the lexer's tables (Unicode 6.x) lack but Python's Unicode database has (measured against the
# jar with the Unicode 14 tables of Python 3.11), and two letters that Unicode later made combining marks.
_NEWER_THAN_LEXER = re.compile(
    "[\u037f\u0528-\u052f\u0560\u0588\u05ef\u0860-\u086a\u0870-\u0887\u0889-\u088e\u08a1\u08ad-\u08c9\u0978\u0980"
    "\u09fc\u0af9\u0c34\u0c5a\u0c5d\u0c80\u0cdd\u0d04\u0d54-\u0d56\u0d5f\u0de6-\u0def\u0e86\u0e89\u0e8c\u0e8e-\u0e93"
    "\u0e98\u0ea0\u0ea8-\u0ea9\u0eac\u13f5\u13f8-\u13fd\u16f1-\u16f8\u170d\u171f\u1878\u191d-\u191e\u19b0-\u19c0"
    "\u19c8-\u19c9\u1b4c\u1c80-\u1c88\u1c90-\u1cba\u1cbd-\u1cbf\u1cf2-\u1cf3\u1cfa\u2c2f\u2c5f\u312e-\u312f"
    "\u31bb-\u31bf\u4db6-\u4dbf\u9fcd-\u9fff\ua698-\ua69d\ua78f\ua794-\ua79f\ua7ab-\ua7ca\ua7d0-\ua7d1\ua7d3"
    "\ua7d5-\ua7d9\ua7f2-\ua7f7\ua8fd-\ua8fe\ua9e0-\ua9e4\ua9e6-\ua9fe\uaa7e-\uaa7f\uab30-\uab5a\uab5c-\uab69"
    "\uab70-\uabbf]"
)
_OLD_LETTERS = "\u1885\u1886"
_ALPHA = _bmp_class(lambda c: c.isalpha() and not _NEWER_THAN_LEXER.match(c)) + _OLD_LETTERS  # Java isLetter
_DIGITS = _bmp_class(lambda c: c.isdecimal() and not _NEWER_THAN_LEXER.match(c))  # Java Character.isDigit
ALPHA = f"[{_ALPHA}]"
ALNUM = f"[{_ALPHA}{_DIGITS}]"
# Java isUpperCase; Cherokee capitals only became uppercase letters in Unicode 8.
_CHEROKEE = re.compile("[\u13a0-\u13f5]")
UPPER = "[" + _bmp_class(lambda c: c.isupper() and not _NEWER_THAN_LEXER.match(c) and not _CHEROKEE.match(c)) + "]"
SPLET = "&[aeiouAEIOU]" + _ci("acute", "grave", "uml") + ";"
LETTER = f"(?:[{_ALPHA}{_LETTER_EXTRA}]|{SPLET})"
DIGIT = f"[{_DIGITS}\u07c0-\u07c9]"
_NAME = "[A-Za-z][A-Za-z0-9_:.-]*"
SGML = (
    f"<(?:[!?][A-Za-z-][^>\r\n]*|/{_NAME}"
    f"|{_NAME}(?:[ ]+(?:{_NAME}[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\")|{_NAME}))*[ ]*/?)[ ]*>"
)
SPMDASH = "&" + _ci("mdash", "ndash", "md") + ";|[\u0096\u0097\u2013\u2014\u2015]"
SPAMP = _ci("&amp;")
SPPUNC = "&(?:" + _ci("ht", "tl", "ur", "lr", "qc", "ql", "qr", "odq", "cdq") + "|#[0-9]+);"
SENTEND = f"{SPACENL}(?:{SPACENL}|{UPPER}|{SGML})"
DATE = f"{DIGIT}{{1,2}}[-/]{DIGIT}{{1,2}}[-/]{DIGIT}{{2,4}}"
NUM = f"{DIGIT}*(?:[.:,\u00ad\u066b\u066c]{DIGIT}+)+|{DIGIT}+"
NUMBER = f"[-+]?(?:{NUM})"
SUBSUPNUM = "[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"
FRAC = f"(?:{DIGIT}{{1,4}}[- \u00a0])?{DIGIT}{{1,4}}(?:\\\\?/|\u2044){DIGIT}{{1,4}}"
FRAC2 = "[\u00bc\u00bd\u00be\u2153-\u215e]"
DOLSIGN = "[A-Z]*\\$|#"
DOLSIGN2 = "[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"
WORD = f"{LETTER}(?:{LETTER}|{DIGIT})*(?:[.!?]{LETTER}(?:{LETTER}|{DIGIT})*)*"
APOS = "(?:['\u0092\u2019]|" + _ci("&apos;") + ")"
APOSETCETERA = f"(?:{APOS}|[`\u0091\u2018\u201b])"
HYPHEN = "[-_\u058a\u2010\u2011]"
THING = f"(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+(?:{HYPHEN}(?:[dDoOlL]{APOSETCETERA}{ALNUM})?{ALNUM}+)*"
THINGA = f"[A-Z]+(?:(?:{SPAMP}|[+&])[A-Z]+)+"
THING3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
ACRO_ALTS = [
    _ci("u\\.s\\.-") + _ci("u\\.s\\.s\\.r", "u\\.k"),
    _ci("canada", "sino", "korean", "eu", "japan", "non") + _ci("-u\\.s"),
    "[A-Za-z](?:\\.[A-Za-z])*",
]
ACRO2 = "(?:" + "|".join([*ACRO_ALTS[:2], "[A-Za-z](?:\\.[A-Za-z])+"]) + ")"
HTHING = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{ACRO2}\\.|[A-Za-z0-9\u00ad]+))+"
REDAUX = f"{APOS}(?:[msdMSD]|{_ci('re', 've', 'll')})"
SWORD = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
SREDAUX = f"{_ci('n')}{APOSETCETERA}{_ci('t')}"
APOWORD_ALTS = [
    f"{APOS}{_ci('n')}{APOS}?",
    f"[lLdDjJ]{APOS}",
    f"{_ci('dunkin', 'somethin', 'ol')}{APOS}",
    f"{APOS}{_ci('em')}",
    f"[A-HJ-XZn]{APOSETCETERA}{ALPHA}{{2,}}",
    f"{APOS}[2-9]0{_ci('s')}",
    f"{APOS}{_ci('till', 'til')}",
    f"{ALPHA}{ALPHA}*[aeiouyAEIOUY]{APOSETCETERA}[aeiouA-Z]{ALPHA}*",
    f"{APOS}{_ci('cause')}",
    f"{_ci('o')}{APOSETCETERA}{_ci('o')}",
    _ci("cont'd\\.?", "nor'easter", "c'mon", "e'er", "s'mores", "ev'ry", "li'l", "nat'l"),
]
APOWORD2 = f"{_ci('y')}{APOS}"
FULLURL = _ci("https?://") + '[^ \t\n\f\r"<>|(){}]+[^ \t\n\f\r"<>|.!?(){},-]'
_URL_PATH = '(?:/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){},-])?'
LIKELYURL_ALTS = [
    _ci("www\\.") + '(?:[^ \t\n\f\r"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}' + _URL_PATH,
    "(?:[^ \t\n\f\r\"`'<>|.!?(){},-_$]+\\.)+" + _ci("com", "net", "org", "edu") + _URL_PATH,
]
EMAIL = (
    "(?:<|" + _ci("&lt;") + ')?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00a0]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\\.)*'
    '[^ \t\n\f\r"<>|(){}.\u00a0]+(?:>|' + _ci("&gt;") + ")?"
)
TWITTER = f"@[a-zA-Z_][a-zA-Z_0-9]*|#{LETTER}+"
ABSTATE = (
    _ci("ala", "ariz", "calif", "colo", "conn", "ct", "dak", "fla", "ga", "ind", "kans", "kan", "ky", "md")
    + "|"
    + _ci("mich", "minn", "mo", "mont", "neb", "nev", "okla", "penn", "tenn", "va", "vt", "wisc", "wis", "wyo")
    + "|"
    + _ci_first(["Ark", "Az", "Del", "Ill", "La", "Mass", "Miss", "Ore", "Pa", "Tex", "Wash"])
)
ABBREV1 = (
    "(?:"
    + _ci("jan", "feb", "mar", "apr", "jun", "jul", "aug", "sept", "sep", "oct", "nov", "dec")
    + "|"
    + _ci("mon", "tues", "tue", "wed", "thurs", "thu", "fri")
    + f"|{ABSTATE}|"
    + _ci("inc", "cos", "co", "corp", "ltd", "plc", "rt", "bancorp", "bhd", "assn", "univ", "intl")
    + "|"
    + _ci("pp?t")
    + "[ye]"
    + _ci("s")
    + "?"
    + "|"
    + _ci("sys", "tel", "est", "ext", "sq", "jr", "sr", "bros", "ed\\.d", "ph\\.d", "blvd", "rd", "esq", "etc", "al")
    + "|"
    + _ci("seq", "bldg")
    + ")\\."
)
ABTITLE = "M" + _ci("iss") + "|" + _ci(
    "mrs", "mr", "ms", "drs", "dr", "profs", "prof", "sens", "sen", "reps", "rep", "attys", "atty", "lt",
    "col", "gen", "messrs", "govs", "gov", "adm", "rev", "maj", "sgt", "cpl", "pvt", "capt", "ste", "st", "ave",
    "pres", "lieut", "hon", "brig", "comdr", "cmdr", "pfc", "spc", "supts", "supt", "det", "mt", "ft", "adj", "adv",
    "asst", "assoc", "ens", "insp", "mlle", "mme", "msgr", "sfc",
)  # fmt: skip
ABBREV4_ALTS = [
    ABTITLE,
    _ci("vs", "alex", "wm", "jos", "cie", "a\\.k\\.a", "cf", "treas", "ph") + "|v",
    *ACRO_ALTS,
    _ci("invt", "elec", "natl", "dept") + "|" + _ci("m") + "[ft]" + _ci("g"),
]
ACRONYM_ALTS = [f"(?:{alt})\\." for alt in ACRO_ALTS]
ABBREV3 = _ci("ca", "figs", "fig", "prop", "nos", "no", "art", "bldg", "pp", "op") + "\\."
FILENAME = f"(?:{LETTER}|{DIGIT})+(?:\\.(?:{LETTER}|{DIGIT})+)*\\." + _ci(
    "bat", "bmp", "class", "cgi", "cpp", "c", "dll", "docx", "doc", "exe", "gif", "gz", "html", "htm", "h", "jar",
    "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl", "png", "ppt", "ps", "py", "sql", "tar", "txt", "wav",
    "xml", "x", "zip",
)  # fmt: skip
# Words after which an acronym's period also ends the sentence ("U.S. The" -> "U.S." "." "The"), or an SGML tag.
_FOLLOWER_WORDS = [
    "About", "According", "Additionally", "After", "An", "A", "As", "At", "But", "Earlier", "He", "Her", "Here",
    "However", "If", "In", "It", "Last", "Many", "More", "Mr\\.", "Ms\\.", "Now", "Once", "One", "Other", "Our", "She",
    "Since", "So", "Some", "Such", "That", "The", "Their", "Then", "There", "These", "They", "This", "We", "When",
    "While", "What", "Yet", "You",
]  # fmt: skip
ACRONYM_FOLLOWERS = f"(?:{_ci_first(_FOLLOWER_WORDS)}|{SGML})"
PHONE_ALTS = [
    "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
    "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}",
    "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}",
]
LDOTS = "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]"
INSENTP = "[,;:\u3001]"
QUOTE_CHARS = "[`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb]"
QUOTES_ALTS = [f"{QUOTE_CHARS}{{1,2}}", "''", APOS]
DBLQUOT = '"|' + _ci("&quot;")
TBSPEC = (
    _ci("-(?:rrb|lrb|rcb|lcb|rsb|lsb)-", "c\\.d\\.s", "pro-", "anti-", "s(?:&|&amp;)p-500", "s(?:&|&amp;)ls")
    + f"|{_ci('cap')}{APOS}{_ci('n')}|{_ci('c')}{APOS}{_ci('est')}"
)
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
ASSIMILATIONS2 = _ci("'tis", "gonna", "gotta", "lemme", "gimme", "wanna")
IGNORED = f"\x00|{SPACE}+|[\u200b\u200e\u200f\ufeff]|[{_NL}]|" + _ci("&nbsp;")

# ---------------------------------------------------------------------------------------------------------------
# Token normalizations done by the Java lexer's actions (CoreNLP 3.4.1 defaults: PTB3 escaping).
# ---------------------------------------------------------------------------------------------------------------
_LATEX_QUOTES = [
    (re.compile("[\u0091\u2018\u201b\u2039]"), "`"),
    (re.compile("[\u0092\u2019\u203a]"), "'"),
    (re.compile("[\u0093\u201c\u00ab]"), "``"),
    (re.compile("[\u0094\u201d\u00bb]"), "''"),
]
_SINGLE_QUOTE = re.compile("&apos;|'")
_DOUBLE_QUOTE = re.compile('"|&quot;')
_CURRENCY = [
    (re.compile("\u00a2"), "cents"),
    (re.compile("\u00a3"), "#"),
    (re.compile("[\u0080\u00a4\u20a0\u20ac]"), "$"),
]
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "{": "-LCB-", "}": "-RCB-", "[": "-LSB-", "]": "-RSB-"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_AMP = re.compile("(?i:&amp;)")


def _quotes(tok: str, probably_left: bool) -> str:
    """LaTeX-style quotes: `` and ` open, '' and ' close."""
    if probably_left:
        tok = _DOUBLE_QUOTE.sub("``", _SINGLE_QUOTE.sub("`", tok))
    else:
        tok = _DOUBLE_QUOTE.sub("''", _SINGLE_QUOTE.sub("'", tok))
    for pattern, repl in _LATEX_QUOTES:
        tok = pattern.sub(repl, tok)
    return tok


def _left_quote(tok: str) -> str:
    return _quotes(tok, True)


def _right_quote(tok: str) -> str:
    return _quotes(tok, False)


def _soft_hyphens(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"


def _currency(tok: str) -> str:
    for pattern, repl in _CURRENCY:
        tok = pattern.sub(repl, tok)
    return tok


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


def _phone(tok: str) -> str:
    return _parens(_nbsp(tok))


def _amp(tok: str) -> str:
    return _AMP.sub("&", tok)


# An action maps the matched text (without trailing context) to (tokens, characters consumed); consuming less than
# the match is JFlex's yypushback.
_Action = Callable[[str], tuple[list[str], int]]


def _emit(normalize: Callable[[str], str] | None = None) -> _Action:
    if normalize is None:
        return lambda tok: ([tok], len(tok))
    return lambda tok: ([normalize(tok)], len(tok))


def _constant(text: str) -> _Action:
    return lambda tok: ([text], len(tok))


def _pushback(n: int) -> _Action:
    """Split off the last ``n`` characters, which are lexed again (can|not, gon|na)."""
    return lambda tok: ([tok[:-n]], len(tok) - n)


def _duplicate_period(tok: str) -> tuple[list[str], int]:
    """Abbreviation ending a sentence: the token keeps its period and the period is lexed again."""
    return [tok], len(tok) - 1


def _acronym(tok: str) -> tuple[list[str], int]:
    """Acronym ending a sentence: "I." gives "I" "."; "U.S." gives "U.S." "."."""
    if len(tok) == 2:
        return [tok[0]], 1
    return [tok], len(tok) - 1


def _skip(tok: str) -> tuple[list[str], int]:
    return [], len(tok)


def _dashes(tok: str) -> tuple[list[str], int]:
    return (["--"] if 3 <= len(tok) <= 4 else [tok]), len(tok)


_KEEP = _emit()
_LETTER_FIRST = f"[{_ALPHA}{_LETTER_EXTRA}&]"
_ALNUM_FIRST = f"[{_ALPHA}{_DIGITS}]"

# Rules in the Java grammar's order: (first-character regex or None for any, alternatives, action[, longest]).
# Alternatives are (token regex, trailing-context regex or None). The lexer takes the longest match, counting the
# trailing context, and the earliest rule on ties, as JFlex does.
_RULE_TABLE: list[tuple] = [
    ("[cCfF]", [(PROG_LANGS, None)], _KEEP),
    ("[cC']", [(ASSIMILATIONS3, None)], _pushback(3)),
    ("[gGlLwW']", [(ASSIMILATIONS2, None)], _pushback(2)),
    ("<", [(SGML, None)], _emit(_nbsp)),
    (None, [(SPMDASH, None)], _constant("--")),
    ("&", [(SPAMP, None)], _constant("&")),
    ("&", [(SPPUNC, None)], _KEEP),
    (_LETTER_FIRST, [(WORD, REDAUX)], _emit(_soft_hyphens)),
    ("[A-Za-z\u00ad]", [(SWORD, SREDAUX)], _emit(_soft_hyphens)),
    (_LETTER_FIRST, [(WORD, None)], _emit(_soft_hyphens)),
    (None, [(alt, None) for alt in APOWORD_ALTS], _KEEP),
    ("[yY]", [(APOWORD2, ALPHA)], _KEEP),
    ("[hH]", [(FULLURL, None)], _KEEP),
    (None, [(alt, None) for alt in LIKELYURL_ALTS], _KEEP, 0),
    ("[a-zA-Z0-9<&]", [(EMAIL, None)], _KEEP, 0),
    ("[@#]", [(TWITTER, None)], _KEEP),
    (None, [(REDAUX, "[^A-Za-z]")], _emit(_right_quote)),
    ("[nN]", [(SREDAUX, None)], _emit(_right_quote)),
    (None, [(DATE, None)], _KEEP),
    (None, [(NUMBER, None)], _emit(_soft_hyphens)),
    (None, [(SUBSUPNUM, None)], _KEEP),
    (None, [(FRAC, None)], _emit(_nbsp)),
    (FRAC2, [(FRAC2, None)], _emit(lambda t: _FRACTIONS.get(t, t))),
    (None, [(TBSPEC, None)], _emit(_amp)),
    ("[A-Za-z0-9]", [(THING3, None)], _KEEP),
    ("[A-Z$#]", [(DOLSIGN, None)], _KEEP),
    (DOLSIGN2, [(DOLSIGN2, None)], _emit(_currency)),
    ("[A-Za-z]", [(alt, f"{SPACENL}+{ACRONYM_FOLLOWERS}{SPACENL}") for alt in ACRONYM_ALTS], _acronym),
    ("[A-Za-z]", [(ABBREV3, f"{SPACENL}?{DIGIT}")], _KEEP),
    ("[pPcC]", [(_ci("pt") + "[eyEY]\\.|" + _ci("co\\."), f"{SPACE}{_ci('ltd', 'lim')}")], _KEEP),
    ("[A-Za-z]", [(ABBREV1, SENTEND)], _duplicate_period),
    ("[A-Za-z]", [(ABBREV1, "(?s:..)")], _KEEP),
    ("[A-Za-z]", [(ABBREV1, None)], _duplicate_period),
    ("[A-Za-z]", [(f"(?:{alt})\\.", None) for alt in ABBREV4_ALTS], _KEEP),
    ("[A-Za-z]", [(alt, SPACE) for alt in ABBREV4_ALTS], _KEEP),
    ("[A-Za-z]", [(alt, SPACENL) for alt in ACRO_ALTS], _KEEP),
    (None, [(TBSPEC2, SPACENL)], _KEEP),
    (None, [(FILENAME, f"{SPACENL}|[.?!,]")], _KEEP),
    (_LETTER_FIRST, [(WORD + "\\.", INSENTP)], _emit(_soft_hyphens)),
    ("[0-9(+]", [(alt, None) for alt in PHONE_ALTS], _emit(_phone), 24),
    ('["&]', [(DBLQUOT, "[A-Za-z0-9$]")], _emit(_left_quote)),
    ('["&]', [(DBLQUOT, None)], _emit(_right_quote)),
    ("\x7f", [("\x7f", None)], _skip),
    ("[<&]", [("<|" + _ci("&lt;"), None)], _constant("<")),
    ("[>&]", [(">|" + _ci("&gt;"), None)], _constant(">")),
    ("[<>:;=]", [(SMILEY, "[^A-Za-z0-9]")], _emit(_parens)),
    (None, [(ASIANSMILEY, None)], _emit(_parens)),
    ("[(){}\\[\\]]", [("[(){}\\[\\]]", None)], _emit(_BRACKETS.__getitem__)),
    ("-", [("-+", None)], _dashes),
    ("[.\u0085\u2026]", [(LDOTS, None)], _constant("...")),
    ("[@#_]", [("@+|#+|_+", None)], _KEEP),
    ("[*\\\\]", [("\\*+|(?:\\\\\\*){1,3}", None)], _KEEP),
    (INSENTP, [(INSENTP, None)], _KEEP),
    ("[?!]", [("[?!]+", None)], _KEEP),
    (None, [("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", None)], _KEEP),
    ("=", [("=", None)], _KEEP),
    ("/", [("/", None)], _KEEP),
    ("[A-Za-z0-9]", [(HTHING + "\\.", INSENTP)], _emit(_soft_hyphens), 0),
    ("[A-Za-z0-9]", [(HTHING, None)], _emit(_soft_hyphens), 0),
    (_ALNUM_FIRST, [(THING + "\\.", INSENTP)], _KEEP),
    (_ALNUM_FIRST, [(THING, None)], _KEEP),
    ("[A-Z]", [(THINGA + "\\.", INSENTP)], _emit(_amp)),
    ("[A-Z]", [(THINGA, None)], _emit(_amp)),
    ("'", [("'", "[A-Za-z][^ \t\n\r\u00a0]")], _emit(_left_quote)),
    (None, [(REDAUX, None)], _emit(_right_quote)),
    (None, [(alt, None) for alt in QUOTES_ALTS], _emit(_right_quote)),
    ("[<>]", [("<<|>>", None)], _KEEP),
    (None, [(MISCSYMBOL, None)], _KEEP),
    (None, [(IGNORED, None)], _skip),
    (None, [("(?s:.)", None)], _skip),  # untokenizable characters are deleted
]


_WHITESPACE = re.compile("[ \t\n\f\r]")


class _Rule:
    """One lexer rule with compiled alternatives; ``match`` gives (total length, token length) of its longest match.

    Python's regex engine returns the first match its backtracking finds, JFlex the longest. The two agree for the
    rules here except URLs, e-mail addresses, phone numbers and hyphenated words, whose longest match is searched
    for explicitly (``longest``: the most characters they can span, or 0 for "up to the next whitespace").
    """

    __slots__ = ("first", "alternatives", "action", "longest")

    def __init__(
        self, first: str | None, alternatives: list[tuple[str, str | None]], action: _Action, longest: int | None = None
    ):
        self.first = re.compile(first) if first is not None else None
        self.alternatives = [
            (re.compile(token if trailing is None else f"(?P<token>{token})(?:{trailing})"), trailing is not None)
            for token, trailing in alternatives
        ]
        self.action = action
        self.longest = longest

    def match(self, text: str, pos: int) -> tuple[int, int]:
        best_total, best_token = 0, 0
        for regex, has_trailing in self.alternatives:
            m = regex.match(text, pos)
            if m is None:
                continue
            if self.longest is not None:
                m = self._longest(regex, text, pos, m)
            if m.end() - pos > best_total:
                best_total = m.end() - pos
                best_token = (m.end("token") if has_trailing else m.end()) - pos
        return best_total, best_token

    def _longest(self, regex: re.Pattern[str], text: str, pos: int, m: re.Match[str]) -> re.Match[str]:
        if self.longest:
            bound = min(len(text), pos + self.longest)
        else:
            space = _WHITESPACE.search(text, pos)
            bound = space.start() if space is not None else len(text)
        for end in range(bound, m.end(), -1):
            longer = regex.fullmatch(text, pos, end)
            if longer is not None:
                return longer
        return m


_RULES = [_Rule(*row) for row in _RULE_TABLE]


@lru_cache(maxsize=4096)
def _rules_for(char: str) -> tuple[_Rule, ...]:
    """Rules whose match can start with ``char``."""
    return tuple(rule for rule in _RULES if rule.first is None or rule.first.match(char))


# Fast path for the common case, checked against the full rules: an ASCII word or number, or a lone punctuation
# mark, followed by a space, the end of the line, or one of .,;: and then a space or the end of the line.
_PLAIN = re.compile("(?:[A-Za-z]+|[0-9]+|[.,;:!?])(?=[.,;:]?(?:[ \t\n]|$))")
_SPLIT_WORDS = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
# Words that some rule may join with a following period.
_ABBREVIATION = re.compile(
    "(?:" + "|".join([ABBREV1[:-2], ABBREV3[:-2], *ABBREV4_ALTS, _ci("pt") + "[eyEY]|" + _ci("co")]) + ")"
)
_SPACES = re.compile(f"{SPACE}+")


def _plain_token(text: str, pos: int) -> str | None:
    """The token at ``pos`` when no rule but the obvious one can apply there, else None."""
    m = _PLAIN.match(text, pos)
    if m is None:
        return None
    token = m.group()
    end = m.end()
    after = text[end : end + 1]
    if token[0].isalpha():
        if token.lower() in _SPLIT_WORDS or (after == "." and _ABBREVIATION.fullmatch(token)):
            return None
    elif token[0].isdigit():
        if after in (" ", "\t") and text[end + 1 : end + 2].isdigit():  # fractions and phone numbers span spaces
            return None
    elif after in (".", ",", ";", ":") or (token == "." and text[end + 1 : end + 2] == "."):
        return None  # a punctuation mark that may belong to "...", ". . .", ".," and the like
    return token


def _lex(text: str) -> list[str | None]:
    """Java PTBLexer tokens of ``text`` before lowercasing; None marks a line end (the -preserveLines ``*NL*``)."""
    tokens: list[str | None] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char == " " or char == "\t":  # only the whitespace rule can match here: skip the whole run
            pos = _SPACES.match(text, pos).end()
            continue
        if char == "\n":
            tokens.append(None)
            pos += 1
            continue
        plain = _plain_token(text, pos)
        if plain is not None:
            tokens.append(plain)
            pos += len(plain)
            continue
        best_rule, best_total, best_token = None, 0, 0
        for rule in _rules_for(char):
            total, token_len = rule.match(text, pos)
            if total > best_total:
                best_rule, best_total, best_token = rule, total, token_len
        produced, consumed = best_rule.action(text[pos : pos + best_token])
        tokens.extend(produced)
        pos += consumed
    return tokens


def _java_output(text: str) -> str:
    """What ``PTBTokenizer -preserveLines -lowerCase`` prints for ``text``: tokens joined by spaces, line by line."""
    lines: list[str] = []
    line: list[str] = []
    for token in _lex(text):
        if token is None:
            lines.append(" ".join(line))
            line = []
        else:
            line.append(_java_lower(token))
    lines.append(" ".join(line))
    return "\n".join(lines)


def _char_kind(char: str) -> str:
    """Class of a character for Java's word BreakIterator: L letter, N number, I ignored, M joins letters,
    B joins letters or digits, D joins digits, O other."""
    if char in "\"'.":
        return "B"
    if char in ",\u066b":
        return "D"
    category = unicodedata.category(char)
    if category[0] == "L" or category == "Mc":
        return "L"
    if category[0] == "N":
        return "N"
    if category in ("Pd", "Pc") or char in "\u00ad\u2027":
        return "M"
    if category in ("Mn", "Me", "Cf"):
        return "I"
    return "O"


def _is_cased(char: str) -> bool:
    return char.islower() or char.isupper() or char.istitle()


# Capitals that Python (Unicode 14) lowercases but Java 17 (Unicode 13) leaves alone.
_NO_JAVA_LOWERCASE = frozenset("\u2c2f\ua7c0\ua7d0\ua7d6\ua7d8")
_SPECIAL_CASING = re.compile("[\u03a3\u2c2f\ua7c0\ua7d0\ua7d6\ua7d8]")


def _java_lower(token: str) -> str:
    """Java's ``toLowerCase(Locale.ENGLISH)``: ``str.lower`` except for a few capitals and the final-sigma rule."""
    if token.isascii() or not _SPECIAL_CASING.search(token):
        return token.lower()
    out = []
    for i, char in enumerate(token):
        if char in _NO_JAVA_LOWERCASE:
            out.append(char)
        elif char != "\u03a3":
            out.append(char.lower())
        else:
            out.append("\u03c2" if _is_final_sigma(token, i) else "\u03c3")
    return "".join(out)


def _word_span(token: str, i: int) -> tuple[int, int]:
    """Extent of the word around ``token[i]`` by the rules of Java's word BreakIterator (measured): letters and
    numbers run together, a dash, connector, quote or period joins two letters, a quote, comma or period joins two
    digits, and marks and format characters are transparent."""
    positions: list[int] = []
    kinds: list[str] = []
    for j, char in enumerate(token):
        kind = _char_kind(char)
        if kind != "I":
            positions.append(j)
            kinds.append(kind)
        elif positions and positions[-1] == j - 1 and kinds[-1] in "MBD" and unicodedata.category(char) != "Cf":
            kinds[-1] = "O"  # a combining mark on a joining character stops it from joining

    def joiner(m: int) -> bool:
        if m <= 0 or m >= len(kinds) - 1 or kinds[m - 1] != kinds[m + 1]:
            return False
        return (kinds[m] in "MB" and kinds[m - 1] == "L") or (kinds[m] in "BD" and kinds[m - 1] == "N")

    first = last = positions.index(i)
    while first > 0:
        if kinds[first - 1] in "LN" and kinds[first] in "LN":
            first -= 1
        elif joiner(first - 1):
            first -= 2
        else:
            break
    while last < len(kinds) - 1:
        if kinds[last] in "LN" and kinds[last + 1] in "LN":
            last += 1
        elif joiner(last + 1):
            last += 2
        else:
            break
    return positions[first], positions[last] + 1


def _is_final_sigma(token: str, i: int) -> bool:
    """Java's rule: a cased letter before the sigma and none after it, within the same word."""
    start, end = _word_span(token, i)
    return any(_is_cased(c) for c in token[start:i]) and not any(_is_cased(c) for c in token[i + 1 : end])


def _drop_punctuation(line: str) -> str:
    """pycocoevalcap's treatment of each output line of the Java tokenizer."""
    return " ".join(token for token in line.rstrip().split(" ") if token not in PUNCTUATIONS)


def _tokenize_lines(captions: list[str]) -> list[str]:
    """Tokenize captions the way pycocoevalcap does: one file with a caption per line, through the Java tokenizer.

    Done as one text because the Java lexer looks past line ends ("A." before a line starting with "The") and a
    token can even run over one (a quoted SGML attribute value); newlines inside a caption become spaces, as there.
    """
    text = "\n".join(_LINE_BREAKS.sub(" ", caption) for caption in captions)
    return [_drop_punctuation(line) for line in _java_output(text).split("\n")[: len(captions)]]


def ptb_tokenize(caption: str) -> str:
    """Tokens of one caption, space-joined, exactly as pycocoevalcap's PTBTokenizer gives them for it alone."""
    return _tokenize_lines([caption])[0]


# Captions the lexer's plain-token path (_plain_token) tokenizes word by word: ASCII words separated by single spaces,
# perhaps one final period. Its exceptions are checked in ptb_tokenize_each.
_SIMPLE_CAPTION = re.compile("([A-Za-z]+(?: [A-Za-z]+)*)(\\.?)")


def ptb_tokenize_each(captions: Iterable[str]) -> list[str]:
    """``[ptb_tokenize(caption) for caption in captions]``: each caption alone, so that no caption's tokens depend on
    its neighbours (the tokenization of a reward).

    The common generated caption, ASCII words separated by single spaces with perhaps a final period, is lowercased
    and split directly: the lexer gives exactly that, each word through its plain-token path and the period as a
    punctuation token that is dropped, unless a word is one it splits ("cannot") or the final period may join the
    last word as an abbreviation ("co.", "mr."); those captions, and all others, go through the lexer.
    """
    tokenized = []
    for caption in captions:
        simple = _SIMPLE_CAPTION.fullmatch(caption)
        if simple is not None:
            words = simple.group(1)
            lowered = words.lower()
            last = words[words.rfind(" ") + 1 :]  # as written: the abbreviation rules are partly case-sensitive
            if _SPLIT_WORDS.isdisjoint(lowered.split(" ")) and not (simple.group(2) and _ABBREVIATION.fullmatch(last)):
                tokenized.append(lowered)
                continue
        tokenized.append(ptb_tokenize(caption))
    return tokenized


def tokenize_captions(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """Tokenize every caption of ``{image_id: [caption, ...]}`` like ``PTBTokenizer().tokenize`` (same shape).

    Captions are tokenized together, in the dict's order, so that the few context-dependent rules of the Java lexer
    see the same neighbouring captions as in pycocoevalcap.
    """
    lines = iter(_tokenize_lines([caption for caps in captions.values() for caption in caps]))
    return {key: [next(lines) for _ in caps] for key, caps in captions.items()}
