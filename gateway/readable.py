"""Readable text of a message: its HTML as plain text, a reply's quoted history and signature
stripped, and safe display names for its attachments.

Pure functions over strings, no I/O. They must never raise on any input nor take unbounded
time on hostile input, never let markup out of HTML or a path out of a file name, and never
turn a message that has text into an empty one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import lxml.html  # type: ignore[import-untyped]

# Everything here is linear or close to it, but regexes and the HTML parser still cost a
# few microseconds a character: cap what we look at so one message cannot stall a worker.
MAX_INPUT_CHARS = 1_000_000

_SURROGATE = re.compile(r"[\ud800-\udfff]")
# C0 controls except tab and newline, DEL and C1 controls: invisible, and some terminals
# act on them. A NUL also truncates text in C consumers of the database.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _clean(text: str) -> str:
    """Cap, normalise newlines, and replace what cannot be stored or shown safely."""
    text = text[:MAX_INPUT_CHARS]
    # A lone surrogate (from a surrogateescape decode) cannot be encoded as UTF-8, so
    # SQLite and every writer would raise on it: make it a replacement character. (ASCII
    # text has none: isascii is a C flag test, the scan costs ~5 us a KB.)
    if not text.isascii():
        text = _SURROGATE.sub("\ufffd", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


# ---------------------------------------------------------------------------------------
# HTML to text

# Elements whose content is never text for a reader: code, styling, metadata, embedded
# documents. Their whole subtree is dropped.
_DROP = frozenset(
    {
        "script",
        "style",
        "head",
        "title",
        "meta",
        "link",
        "noscript",
        "template",
        "iframe",
        "frame",
        "frameset",
        "object",
        "embed",
        "applet",
        "svg",
        "math",
        "canvas",
        "audio",
        "video",
        "select",
        "button",
        "textarea",
        "input",
        "img",
        "map",
        "area",
    }
)
# Elements that start and end a line.
_BLOCK = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "center",
        "dd",
        "details",
        "dialog",
        "dir",
        "div",
        "dl",
        "dt",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "header",
        "hgroup",
        "html",
        "legend",
        "li",
        "main",
        "menu",
        "nav",
        "ol",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "tfoot",
        "thead",
        "tr",
        "ul",
        "caption",
    }
)
# Elements set off by a blank line, as a mail program shows them.
_PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "hr"})
_CELL = frozenset({"td", "th"})
_LINK_SCHEMES = ("http://", "https://", "mailto:")

# Markers in the token stream; real text never contains these control characters because
# _clean removed them from the input.
_NL = "\x01"  # end the current line, unless it is still empty
_PARA = "\x02"  # as _NL, and leave a blank line before the next text
_HARD_NL = "\x03"  # a line break inside <pre>: always kept
_HARD_SPACE = "\x04"  # a space inside <pre> or a list indent: never trimmed
_QUOTE_IN = "\x05"  # a <blockquote> starts: its lines get one more "> "
_QUOTE_OUT = "\x06"  # a <blockquote> ends

_WS = re.compile(r"[ \t\n\x0b\x0c\xa0\u2000-\u200a\u202f\u205f\u3000]+")
# Something that a browser would take for a tag, left in the text by entities such as
# "&lt;script&gt;": defused so that no later HTML view can mistake it for markup.
_TAG_LIKE = re.compile(r"<(?=/?[A-Za-z][A-Za-z0-9-]*(?:[\s/>]|$)|[!?])")


def _link_target(href: object, label: str) -> str:
    """The URL to show after a link's text, or "" when it adds nothing or is not safe."""
    if not isinstance(href, str):
        return ""
    url = _WS.sub("", href)
    if not url.lower().startswith(_LINK_SCHEMES):
        # javascript:, data:, vbscript:, relative links: nothing a reader should follow.
        return ""
    shown = url[7:] if url.lower().startswith("mailto:") else url
    if shown.lower() in {label.strip().lower(), label.strip().lower().rstrip("/")}:
        return ""
    return url.replace("<", "%3C").replace(">", "%3E")


def _render(root: object) -> str:
    """Walk the parsed tree (iteratively: no recursion limit to hit) into text tokens."""
    out: list[str] = []
    # Each stack entry is (element, entering?, list depth, in <pre>?). On leaving an element
    # we emit what follows it: the closing newline and then its tail text.
    stack: list[tuple[object, bool, int, bool]] = [(root, True, 0, False)]
    counters: dict[int, int] = {}
    while stack:
        node, entering, depth, pre = stack.pop()
        tag = getattr(node, "tag", None)
        name = tag.lower() if isinstance(tag, str) else ""
        if entering:
            if name in _DROP or not isinstance(tag, str):
                # Comments and processing instructions have a non-string tag; their text is
                # not content. Only the tail after them is.
                _emit(out, getattr(node, "tail", None), pre)
                continue
            if name == "br":
                out.append(_NL)
                _emit(out, getattr(node, "tail", None), pre)
                continue
            if name in _PARAGRAPH:
                out.append(_PARA)
            elif name in _BLOCK:
                out.append(_NL)
            elif name in _CELL:
                out.append(" ")
            if name == "blockquote":
                out.append(_QUOTE_IN)
            child_depth = depth
            if name in ("ul", "ol", "dir", "menu"):
                child_depth = depth + 1
                counters[id(node)] = 0
            if name == "li":
                parent = getattr(node, "getparent", lambda: None)()
                indent = _HARD_SPACE * 2 * max(depth - 1, 0)
                if parent is not None and getattr(parent, "tag", "") == "ol":
                    counters[id(parent)] = counters.get(id(parent), 0) + 1
                    out.append(f"{indent}{counters[id(parent)]}. ")
                else:
                    out.append(f"{indent}- ")
            if name == "hr":
                out.append("----")
            child_pre = pre or name == "pre"
            stack.append((node, False, depth, pre))
            _emit(out, getattr(node, "text", None), child_pre)
            children = list(node)  # type: ignore[call-overload]
            for child in reversed(children):
                stack.append((child, True, child_depth, child_pre))
        else:
            if name == "a":
                label = "".join(getattr(node, "itertext", lambda: [])())
                target = _link_target(getattr(node, "get", lambda _k: None)("href"), label)
                if target:
                    out.append(f" [{target}]")
            if name == "blockquote":
                out.append(_QUOTE_OUT)
            if name in _PARAGRAPH:
                out.append(_PARA)
            elif name in _BLOCK:
                out.append(_NL)
            _emit(out, getattr(node, "tail", None), pre)
    return "".join(out)


def _emit(out: list[str], text: object, pre: bool) -> None:
    if not isinstance(text, str) or not text:
        return
    if pre:
        out.append(text.replace("\n", _HARD_NL).replace(" ", _HARD_SPACE))
    else:
        out.append(_WS.sub(" ", text))


def _tidy(tokens: str) -> str:
    """Turn the token stream into lines: one line break per block boundary however deeply
    blocks nest, at most one blank line in a row, no spaces at either end of a line, and
    "> " before each line of a <blockquote>, as a mail program quotes in plain text (which
    is also what lets strip_reply find the quoted history of an HTML-only reply)."""
    texts = [""]
    depths = [0]  # the quote depth of each line
    depth = 0
    blank_wanted = False
    for part in re.split(f"([{_NL}{_PARA}{_HARD_NL}{_QUOTE_IN}{_QUOTE_OUT}])", tokens):
        if part in (_NL, _PARA, _QUOTE_IN, _QUOTE_OUT):
            if part == _QUOTE_IN:
                depth += 1
            elif part == _QUOTE_OUT:
                depth = max(depth - 1, 0)
            # Start a new line unless the current one is still empty.
            if texts[-1].strip(" "):
                texts.append("")
                depths.append(depth)
            else:
                texts[-1], depths[-1] = "", depth
            blank_wanted = blank_wanted or part == _PARA
        elif part == _HARD_NL:
            texts.append("")
            depths.append(depth)
        elif part.strip(" "):
            if blank_wanted and texts[-1] == "" and len(texts) >= 2 and texts[-2] != "":
                texts.insert(-1, "")
                depths.insert(-1, min(depth, depths[-2]))
            blank_wanted = False
            texts[-1] = (texts[-1] + part).lstrip(" ")
        elif texts[-1]:
            texts[-1] += part
    lines = [("> " * d + t).rstrip(" ") for d, t in zip(depths, texts, strict=True)]
    return "\n".join(lines).replace(_HARD_SPACE, " ").strip("\n")


def html_to_text(html: str) -> str:
    """Plain text of an HTML body, as a mail program would show it.

    Scripts, styles, the head and comments are dropped; block elements and <br> become line
    breaks; entities are decoded; a link keeps its text, followed by its URL in brackets
    when that is http, https or mailto (never javascript: or data:). No markup survives.
    """
    html = html if isinstance(html, str) else ""
    try:
        html = _clean(html)
        if not html.strip():
            return ""
        # Bytes with an explicit encoding: lxml refuses a str that carries an XML encoding
        # declaration, and a <meta charset> in the mail must not re-decode text that the
        # MIME layer already decoded.
        parser = lxml.html.HTMLParser(
            encoding="utf-8",
            recover=True,
            no_network=True,
            remove_comments=True,
            remove_pis=True,
        )
        try:
            root = lxml.html.document_fromstring(html.encode("utf-8"), parser=parser)
        except Exception:
            # lxml raises on documents with no elements left (only a comment, say).
            return ""
        text = _tidy(_render(root))
        return _TAG_LIKE.sub("\u2039", _clean(text))
    except Exception:
        # Never fail a message over its HTML: fall back to dropping everything tag-shaped.
        stripped = re.sub(r"<[^<>]{0,10000}>", " ", html[:MAX_INPUT_CHARS])
        return _TAG_LIKE.sub("\u2039", _WS.sub(" ", stripped)).strip()


def readable_text(text: str, html: str) -> str:
    """The text/plain body when it has any content, else the HTML body as text."""
    text = _clean(text) if isinstance(text, str) else ""
    if text.strip():
        return text
    return html_to_text(html)


def reply_text(text: str, html: str) -> str:
    """strip_reply(readable_text(text, html)), with the text cleaned once rather than twice
    (_clean gives a text it leaves as it is)."""
    cleaned = _clean(text) if isinstance(text, str) else ""
    if not cleaned.strip():
        return strip_reply(html_to_text(html))
    try:
        return _strip_cleaned(cleaned)
    except Exception:
        # As strip_reply: never lose a message's text to a bug in the heuristics.
        return cleaned.strip()


# ---------------------------------------------------------------------------------------
# Quoted history and signature
#
# No library is used here: the maintained ones (mail-parser-reply, email-reply-parser,
# quotequail) each reached 57-77% of talon's corpus alone, and each took minutes on some
# 20-200 KB input (nested or unbounded regex quantifiers; a quadratic header scan). These
# rules work line by line: every line is classified once with anchored regexes on at most
# _MAX_MATCH_LINE characters, and every look-around is a fixed few lines, so the cost is
# linear in the input.

# Lines examined for quotes; see strip_reply.
_MAX_LINES = 100_000
# A line longer than this is body text, never an attribution, header or marker.
_MAX_MATCH_LINE = 1000
# An attribution ("On <date>, <name> wrote:") wrapped over at most this many lines.
_MAX_ATTRIBUTION_LINES = 3
# Blank lines allowed between an attribution and the quote or header block it introduces.
_MAX_GAP = 2

# Non-Latin words are written as escapes, because ruff rightly flags Cyrillic letters that
# look like Latin ones; each regex's comment gives them in transliteration.
#
# Outlook and friends put these between the reply and the message replied to or forwarded.
# Russian: "iskhodnoe soobshchenie" (original), "peresylaemoe soobshchenie" (forwarded).
_ORIGINAL_MARKER = re.compile(
    r"^\s*[-_=*]{2,}\s*(?:original message|forwarded message|urspr\u00fcngliche nachricht"
    r"|weitergeleitete nachricht|message d'origine|message transf\u00e9r\u00e9"
    r"|mensaje original|mensaje reenviado|oorspronkelijk bericht|doorgestuurd bericht"
    r"|messaggio originale|messaggio inoltrato|originalmeddelande|vidarebefordrat meddelande"
    r"|mensagem original|mensagem encaminhada|\u0438\u0441\u0445\u043e\u0434\u043d\u043e\u0435"
    r" \u0441\u043e\u043e\u0431\u0449\u0435\u043d\u0438\u0435|\u043f\u0435\u0440\u0435\u0441"
    r"\u044b\u043b\u0430\u0435\u043c\u043e\u0435 \u0441\u043e\u043e\u0431\u0449\u0435\u043d"
    r"\u0438\u0435)\s*[-_=*]{0,40}\s*$"
    r"|^\s*(?:begin forwarded message|anfang der weitergeleiteten (?:e-mail|nachricht)"
    r"|d\u00e9but du message r\u00e9exp\u00e9di\u00e9|inicio del mensaje reenviado"
    r"|begin doorgestuurd bericht)\s*:?\s*$",
    re.IGNORECASE,
)
# Outlook's "________________________________" line above the header block of a reply.
_UNDERSCORE_RULE = re.compile(r"^\s*_{10,}\s*$")
# A separator drawn with dashes, underscores, equals signs, stars or tildes (and the
# "----" html_to_text writes for <hr>).
_RULE = re.compile(r"^\s*(?:[-_=*~]\s?){3,}\s*$")
# One header of a quoted header block, in the languages mail programs write them in.
# Russian: ot (from), otpravleno (sent), komu (to), tema (subject), data, kopiya (cc).
_HEADER = re.compile(
    r"^\s{0,4}[*>]?\s{0,2}(from|sent|to|cc|subject|date|von|gesendet|an|betreff|datum"
    r"|de|envoy\u00e9|\u00e0|objet|para|enviado|asunto|fecha|van|verzonden|aan|onderwerp"
    r"|da|inviato|a|oggetto|data|fr\u00e5n|skickat|till|\u00e4mne"
    r"|\u043e\u0442|\u043e\u0442\u043f\u0440\u0430\u0432\u043b\u0435\u043d\u043e|\u043a\u043e"
    r"\u043c\u0443|\u0442\u0435\u043c\u0430|\u0434\u0430\u0442\u0430|\u043a\u043e\u043f\u0438"
    r"\u044f)\s{0,2}\*?\s{0,2}:",
    re.IGNORECASE,
)
_FROM_HEADERS = frozenset({"from", "von", "de", "van", "da", "fr\u00e5n", "\u043e\u0442"})
# The end of an attribution line: the verb of "<someone> wrote:" in the common languages.
# Russian: napisal, napisala, napisal(a), pishet.
_ATTRIBUTION_VERB = re.compile(
    r"(?:\bwrote|\bschrieb(?:[^:\n]{0,80})?|\ba\s+\u00e9crit|\bescribi\u00f3|\bschreef"
    r"(?:[^:\n]{0,80})?|\bha\s+scritto|\bescreveu|\bskrev(?:[^:\n]{0,80})?|\bnapsal(?:\(a\))?"
    r"|\bnapisa\u0142(?:\(a\))?|\u043d\u0430\u043f\u0438\u0441\u0430\u043b(?:\u0430|\(\u0430\))?"
    r"|\u043f\u0438\u0448\u0435\u0442)\s*:\s*$",
    re.IGNORECASE,
)
# How an attribution starts: "On", "Am", "Le", ... or a date (Android, Yandex, mail.ru).
_ATTRIBUTION_START = re.compile(
    r"^\s*(?:-{2,}\s*)?(?:(?:on|am|le|el|op|il|em|den|dne|w dniu)\s|\d{1,4}[./-]\d{1,2}[./-]\d{1,4}"
    r"|(?:mon|tue|wed|thu|fri|sat|sun)[a-z]*,?\s+\d)",
    re.IGNORECASE,
)
# A date, a time or an address: what an attribution in any other wording carries.
_DATE_OR_ADDRESS = re.compile(r"\d{1,2}:\d{2}|\d{4}|@")

# Signatures. "-- " is the delimiter of RFC 3676 section 4.3; many programs drop its space.
_SIG_DELIMITER = "-- "
# "Sent from my iPhone" and its kin; Russian: "otpravleno s/iz".
_DEVICE_LINE = re.compile(
    r"^\s*(?:sent from my|sent from (?:outlook|mail|yahoo|samsung|gmail|proton|aol|blackberry)"
    r"|sent with|sent via"
    r"|sent using|get outlook for|von meinem\s.{1,40}\sgesendet|gesendet von|envoy\u00e9 de mon"
    r"|envoy\u00e9 depuis|enviado desde|enviado do meu|verzonden (?:met|vanaf)|inviato da"
    r"|skickat fr\u00e5n|\u043e\u0442\u043f\u0440\u0430\u0432\u043b\u0435\u043d\u043e"
    r" (?:\u0441|\u0438\u0437))\b",
    re.IGNORECASE,
)
# What may follow the device or app in a device line: a link to the app, an apology for
# brevity or typos. Whatever else is left must read as a device's name, not as a sentence:
# "Sent from my laptop I get error 42" and "Sent from my phone because ..." are the message.
_DEVICE_LINE_EXTRAS = re.compile(
    r"<?https?://\S*>?|\[https?://[^\]]*\]"
    r"|[,.;:\s-]*(?:please\s+)?(?:excuse|forgive|pardon|sorry for)\s+(?:the\s+|my\s+|any\s+)?"
    r"(?:typos?|brevity|spelling|mistakes|errors|autocorrect)[.!]*\s*$",
    re.IGNORECASE,
)
_NOT_A_DEVICE = re.compile(
    r"[?;!:]|\b(?:i|we|you|he|she|they|because|since|but|so|that|which|while|when|if|is|are"
    r"|was|were|will|would|can|could|please|yesterday|today)\b",
    re.IGNORECASE,
)
_MAX_DEVICE_NAME = 80
# A dash sign-off: "-Bob", "--Alice", "-- Alice Example" on a line of its own. A single
# dash touches the name ("- Bob" is a list item); no word may start with a lower-case letter
# (checked in _is_dash_sign_off: "-verbose" is an option, "-5" a number).
_DASH_SIGN_OFF = re.compile(
    r"^\s*(?:-{1,2}|--\s+)([^\W\d_][\w.'\u2019-]*(?:\s+[^\W\d_][\w.'\u2019-]*){0,3})\s*$"
)
# A mailing list's footer, set off by a rule or "--" (Mailman, Google Groups, LISTSERV).
_LIST_FOOTER = re.compile(
    r"mailing list|\bunsubscribe\b|/listinfo/|you received this message because you are"
    r" subscribed",
    re.IGNORECASE,
)
_MAX_FOOTER_LINES = 8
# A sign-off line on its own; Russian: "s uvazheniem" (regards), "spasibo" (thanks).
_SIGN_OFF = re.compile(
    r"^\s*(?:thanks|thank you|many thanks|thanks again|thanks in advance|thx|regards"
    r"|best regards|kind regards|warm regards|with regards|best wishes|best|cheers|sincerely"
    r"|yours sincerely|yours truly|yours|mit freundlichen gr\u00fc(?:\u00df|ss)en|viele gr\u00fc"
    r"(?:\u00df|ss)e|beste gr\u00fc(?:\u00df|ss)e|liebe gr\u00fc(?:\u00df|ss)e|gr\u00fc"
    r"(?:\u00df|ss)e|gru(?:\u00df|ss)|cordialement|bien \u00e0 vous|salutations|merci"
    r"|saludos|un saludo|atentamente|gracias|met vriendelijke groet(?:en)?|groeten"
    r"|cordiali saluti|saluti|grazie|\u0441 \u0443\u0432\u0430\u0436\u0435\u043d\u0438\u0435"
    r"\u043c|\u0441\u043f\u0430\u0441\u0438\u0431\u043e)\s*[,.!\-]*\s*$",
    re.IGNORECASE,
)
# Contact details: an address, a web site, a phone number.
_CONTACT = re.compile(
    r"[\w.+-]+@[\w-]+\.[\w.-]+|\bhttps?://|\bwww\.|(?:\+|\(|\b)\d[\d ().-]{5,}\d\b",
    re.IGNORECASE,
)
_ONLINE_CONTACT = re.compile(r"@|\bhttps?://|\bwww\.", re.IGNORECASE)
# Four or more blank lines in a row (folded to three before the line-by-line work).
_BLANK_RUN = re.compile(r"\n(?:[ \t]*\n){3,}")
# More than one blank line in a row, in the result.
_BLANK_LINES = re.compile(r"\n{3,}")
# Lines a signature may have after its first line, and how long each may be.
_MAX_SIGNATURE_TAIL = 12
_MAX_SIGNATURE_LINE = 80


def _is_blank(line: str) -> bool:
    return not line.strip()


def _is_device_line(line: str) -> bool:
    """A "Sent from my iPhone" line: the device or app's tag, not a sentence that happens to
    start with "Sent from my"."""
    match = _DEVICE_LINE.match(line)
    if match is None:
        return False
    rest = _DEVICE_LINE_EXTRAS.sub(" ", line[match.end() :]).strip().rstrip(".")
    return len(rest) <= _MAX_DEVICE_NAME and _NOT_A_DEVICE.search(rest) is None


def _is_dash_sign_off(lines: list[str], index: int) -> bool:
    """lines[index] is "-Name" or "--Name", and not an item of a list written with dashes."""
    match = _DASH_SIGN_OFF.match(lines[index])
    # A capital, or a letter of a script without case (Chinese, Japanese, Arabic...).
    if match is None or any(word[0].islower() for word in match.group(1).split()):
        return False
    before = next((lines[i] for i in range(index - 1, -1, -1) if not _is_blank(lines[i])), "")
    after = next((lines[i] for i in range(index + 1, len(lines)) if not _is_blank(lines[i])), "")
    # A list: the line before introduces it ("Please buy:") or a neighbour is an item too.
    return not (
        before.rstrip().endswith(":")
        or before.lstrip().startswith("-")
        or after.lstrip().startswith("-")
    )


def _header_blocks(lines: list[str], header: list[str | None]) -> list[bool]:
    """Where a quoted header block (From/Sent/To/Subject, in some language) starts: at
    least two header lines in a row, one of them the sender; or Outlook's whole block on
    one line. Only the first eight lines of a run of header-like lines can start one (a
    block has at most ~8 headers), which keeps this linear however long the run."""
    starts = [False] * len(lines)
    run_start = -1
    for index, name in enumerate(header):
        if name is None:
            run_start = -1
            continue
        if run_start < 0:
            run_start = index
        if index - run_start >= 8:
            continue
        low = lines[index].lower()
        if (
            name == "from"
            and ("sent:" in low or "date:" in low)
            and ("to:" in low or "subject:" in low)
        ):
            starts[index] = True
            continue
        names: set[str] = set()
        for following in header[index : index + 8]:
            if following is None:
                break
            names.add(following)
        starts[index] = len(names) >= 2 and not names.isdisjoint(_FROM_HEADERS)
    return starts


@dataclass(frozen=True)
class _Lines:
    """The lines of a body with what the rules ask of each, worked out once per line so
    that no rule re-examines a line however often its neighbours look at it."""

    text: list[str]
    quoted: list[bool]  # starts with ">"
    blank: list[bool]
    header: list[str | None]  # the header name if the line looks like "From: ..."
    header_block: list[bool]  # a quoted header block starts here

    @classmethod
    def of(cls, lines: list[str]) -> _Lines:
        quoted = [line.lstrip(" ")[:1] == ">" for line in lines]
        blank = [not line.strip() for line in lines]
        header: list[str | None] = [None] * len(lines)
        for index, line in enumerate(lines):
            if ":" in line[:40] and len(line) <= _MAX_MATCH_LINE:
                match = _HEADER.match(line)
                header[index] = match.group(1).lower() if match else None
        return cls(lines, quoted, blank, header, _header_blocks(lines, header))

    def next_content(self, index: int) -> int:
        """The first non-blank line at or after index, skipping at most _MAX_GAP blank
        lines; len(text) when there is none in reach."""
        for at in range(index, min(index + _MAX_GAP + 1, len(self.text))):
            if not self.blank[at]:
                return at
        return len(self.text)

    def is_header_block(self, start: int) -> bool:
        return start < len(self.text) and self.header_block[start]

    def joined(self, start: int, end: int) -> str | None:
        """Lines start..end as one line, or None if a blank or quoted line is among them.
        Gmail wraps "... Alice <" / "a@example.com> wrote:": no space at such a join."""
        if any(self.blank[start : end + 1]) or any(self.quoted[start : end + 1]):
            return None
        joined = ""
        for line in self.text[start : end + 1]:
            piece = line.strip()
            joined = joined + piece if not joined or joined.endswith("<") else f"{joined} {piece}"
        return joined if len(joined) <= _MAX_MATCH_LINE else None

    def attribution_start(self, end: int) -> tuple[int, bool] | None:
        """If line `end` (ending in ":") closes an attribution, where the attribution
        starts and whether it is explicit ("On ... wrote:" and its translations) rather
        than merely a line with a date or address ending in a colon."""
        last = self.text[end].strip()
        if _ATTRIBUTION_VERB.search(last[-200:]):
            # The longest span (up to three lines) that starts like an attribution.
            for start in range(max(end - _MAX_ATTRIBUTION_LINES + 1, 0), end + 1):
                joined = self.joined(start, end)
                if joined is not None and _ATTRIBUTION_START.match(joined):
                    return start, True
            return end, False
        # No verb: a line with a date, a time or an address that ends in a colon, maybe
        # wrapped from the line above at "<", "," or a quote mark (Android, Yandex).
        if end > 0 and self.text[end - 1].rstrip().endswith(("<", ",", '"')):
            joined = self.joined(end - 1, end)
            if (
                joined is not None
                and len(joined) <= 300
                and _ATTRIBUTION_START.match(joined)
                and _DATE_OR_ADDRESS.search(joined)
            ):
                return end - 1, False
        if len(last) <= 300 and _DATE_OR_ADDRESS.search(last):
            return end, False
        return None


def _strip_quotes(lines: _Lines) -> tuple[list[str], bool]:
    """Drop the quoted history: everything from a forward/original-message marker or a
    quoted header block on, ">" blocks with their attribution line, and an explicit
    attribution with everything after it when no ">" block follows.

    Inline replies: when new text stands between two ">" blocks, the reply is interleaved,
    and each ">" block directly followed by an answer is kept as the question it answers;
    ">" blocks followed by no answer are dropped. Otherwise all ">" blocks are dropped, so
    a reply written below the quote (Thunderbird's bottom posting) keeps only the reply.

    Returns the lines kept and whether the text was cut (all after some line dropped).
    """
    text, quoted, blank = lines.text, lines.quoted, lines.blank
    n = len(text)
    dropped = [False] * n
    cut = n
    i = 0
    while i < n:
        line = text[i]
        if quoted[i] or blank[i] or len(line) > _MAX_MATCH_LINE:
            i += 1
            continue
        if lines.is_header_block(i) or _is_marker(lines, i):
            cut = i
            break
        if line.rstrip().endswith(":"):
            found = lines.attribution_start(i)
            if found is not None:
                start, explicit = found
                after = lines.next_content(i + 1)
                if after < n and quoted[after]:
                    dropped[start:after] = [True] * (after - start)
                    i = after
                    continue
                if explicit or lines.is_header_block(after):
                    cut = start
                    break
            elif _ORIGINAL_MARKER.match(line):
                # "Begin forwarded message:" and its translations.
                cut = i
                break
        i += 1

    if not any(quoted[:cut]):
        return [line for line, gone in zip(text[:cut], dropped, strict=False) if not gone], cut < n
    # Split what is left into runs: ">" blocks (with the blank lines inside them) and
    # answers, to decide which blocks an interleaved reply keeps.
    blocks: list[tuple[bool, int, int]] = []  # (is quote, first line, last line)
    for index in range(cut):
        if dropped[index] or blank[index]:
            continue
        kind = quoted[index]
        if blocks and blocks[-1][0] == kind:
            blocks[-1] = (kind, blocks[-1][1], index)
        else:
            blocks.append((kind, index, index))
    # Text after a ">" block answers it unless it is only a signature or a list's footer:
    # a quote followed by "-- \nBob" or by Mailman's footer is still quoted history.
    answers = [
        not kind
        and k > 0
        and not _is_signature_only([text[i] for i in range(first, last + 1) if not dropped[i]])
        for k, (kind, first, last) in enumerate(blocks)
    ]
    last_quote = max((k for k, block in enumerate(blocks) if block[0]), default=-1)
    interleaved = any(
        blocks[k][0] and answers[k + 1] and k + 2 <= last_quote for k in range(len(blocks) - 1)
    )
    for k, (kind, first, last) in enumerate(blocks):
        answered = k + 1 < len(blocks) and answers[k + 1]
        if kind and not (interleaved and answered):
            dropped[first : last + 1] = [True] * (last + 1 - first)
    return [line for line, gone in zip(text[:cut], dropped, strict=False) if not gone], cut < n


def _is_signature_only(block: list[str]) -> bool:
    """Whether these lines are all signature or footer, by the rules of _strip_signature
    (which never strips a text's first line, hence the stand-in line above the block). A
    long block is never only a signature: that also bounds the work per block."""
    if len(block) > 2 * _MAX_SIGNATURE_TAIL:
        return False
    return _strip_signature(["x", "", *block]) == ["x"]


def _is_marker(lines: _Lines, index: int) -> bool:
    """An "-----Original Message-----"-style line, or Outlook's underscore rule with a
    header block right after it."""
    line = lines.text[index]
    if _ORIGINAL_MARKER.match(line):
        return True
    return bool(_UNDERSCORE_RULE.match(line)) and lines.is_header_block(
        lines.next_content(index + 1)
    )


def _trim_end(lines: list[str]) -> list[str]:
    """Drop trailing blank lines and separator rules left above a removed quote."""
    end = len(lines)
    while end and (_is_blank(lines[end - 1]) or _RULE.match(lines[end - 1][:_MAX_MATCH_LINE])):
        end -= 1
    return lines[:end]


def _signature_start(lines: list[str]) -> int | None:
    """Where a trailing signature starts, or None. Only the last lines are examined."""
    first = next((index for index, line in enumerate(lines) if not _is_blank(line)), None)
    if first is None:
        return None
    # The last non-blank lines, in order: the only place a signature can be.
    tail: list[int] = []
    for index in range(len(lines) - 1, first, -1):
        if not _is_blank(lines[index]):
            tail.insert(0, index)
            if len(tail) > _MAX_SIGNATURE_TAIL:
                break

    def short_after(start: int, most: int, width: int) -> bool:
        after = [index for index in tail if index > start]
        return len(after) <= most and all(len(lines[index].strip()) <= width for index in after)

    def has_contact_after(start: int) -> bool:
        return any(
            _CONTACT.search(lines[index][:_MAX_MATCH_LINE]) for index in tail if index > start
        )

    def name_like_after(start: int) -> bool:
        # What follows a sign-off is a name, a title, a company: a few words, not a
        # sentence or a question (so "Thanks\n\nAlso, is the printer fixed?" keeps its
        # question).
        for index in (i for i in tail if i > start):
            line = lines[index].strip()
            words = len(line.split())
            if len(line) > 60 or words > 6 or line.endswith(("?", "!", ":")):
                return False
            if line.endswith(".") and words > 3:
                return False
        return True

    # The RFC delimiter: everything after the last one, however long.
    for index in range(len(lines) - 1, first, -1):
        if lines[index] == _SIG_DELIMITER:
            return index
    for index in reversed(tail):
        line = lines[index][:_MAX_MATCH_LINE]
        if line.strip() == "--" and short_after(index, _MAX_SIGNATURE_TAIL, _MAX_SIGNATURE_LINE):
            return index
        # A list's footer after a rule or "--": its lines are longer than a signature's.
        if (
            (line.strip() == "--" or _RULE.match(line))
            and short_after(index, _MAX_FOOTER_LINES, _MAX_MATCH_LINE)
            and any(_LIST_FOOTER.search(lines[i][:_MAX_MATCH_LINE]) for i in tail if i > index)
        ):
            return index
        # At the end only: no question or sentence after it (then it is not the end).
        if (
            _is_device_line(line)
            and short_after(index, 2, _MAX_SIGNATURE_LINE)
            and name_like_after(index)
        ):
            return index
        if _is_dash_sign_off(lines, index) and short_after(index, 3, 60) and name_like_after(index):
            return index
        # A bare rule is also how people set off a list or a section, so it only counts as
        # a signature delimiter when contact details follow it.
        if (
            _RULE.match(line)
            and short_after(index, _MAX_SIGNATURE_TAIL, _MAX_SIGNATURE_LINE)
            and has_contact_after(index)
        ):
            return index
    # A sign-off ("Thanks,", "Regards") with at most a few short lines (name, title) after.
    for index in reversed(tail[-5:]):
        if _SIGN_OFF.match(lines[index][:_MAX_MATCH_LINE]):
            if short_after(index, 3, 60) and name_like_after(index):
                return index
    # A trailing block of contact details (name, address, phone, web site) set off by a
    # blank line, at most six lines. Not when the text before it introduces it ("Call me
    # back at:").
    if not tail:
        return None
    block_start = tail[-1]
    while block_start > first and not _is_blank(lines[block_start - 1]):
        block_start -= 1
        if tail[-1] - block_start >= 6:
            return None
    block = lines[block_start : tail[-1] + 1]
    before = next(
        (lines[i] for i in range(block_start - 1, first - 1, -1) if not _is_blank(lines[i])), None
    )
    if (
        before is not None
        and all(len(line.strip()) <= 60 for line in block)
        and sum(1 for line in block if _CONTACT.search(line)) >= 2
        and any(_ONLINE_CONTACT.search(line) for line in block)
        and not any(line.rstrip().endswith("?") for line in block)
        and not before.rstrip().endswith(":")
    ):
        return block_start
    return None


def _strip_signature(lines: list[str]) -> list[str]:
    # A signature can stack ("Thanks,\nAlice" above a contact block): peel a few layers.
    for _ in range(4):
        lines = _trim_end(lines)
        start = _signature_start(lines)
        if start is None:
            break
        lines = lines[:start]
    return _trim_end(lines)


def strip_reply(text: str) -> str:
    """The new text of a reply: its quoted history and its signature removed.

    Removes ">" blocks and the attribution line above them ("On <date>, <name> wrote:"
    and its German, French, Spanish, Dutch, Italian, Portuguese, Scandinavian, Czech,
    Polish and Russian forms, also wrapped over two or three lines), Outlook's
    "-----Original Message-----", "From:/Sent:/To:/Subject:" and "____" blocks, forward
    markers, and a trailing signature: "-- " and what follows, a list's footer after a rule
    or "--", a "Sent from my ..." device or app line at the end (never a sentence that
    starts so), a sign-off ("Thanks,", or a dash sign-off "-Bob", "--Alice") with a short
    block after it, a trailing block of contact details. Answers interleaved with quoted
    lines are kept with the lines they answer (see _strip_quotes); a signature or footer
    after a quote answers nothing, so that quote is history too.
    If nothing would be left (a message that is only a quote), the text is returned trimmed.
    """
    try:
        return _strip_cleaned(_clean(text))
    except Exception:
        # Never lose a message's text to a bug in the heuristics: keep all of it.
        return _clean(text).strip() if isinstance(text, str) else ""


def _strip_cleaned(cleaned: str) -> str:
    """strip_reply of a text _clean has made (may raise: the callers fall back)."""
    # Runs of blank lines carry no meaning here: fold them (in C) before the per-line
    # work, so that a body of a million newlines costs no more than a short one.
    folded = _BLANK_RUN.sub("\n\n\n", cleaned)
    lines = folded.split("\n")
    # Past _MAX_LINES lines (only a pasted log or a hostile body has that many) the
    # text is kept as it is, unless it follows a cut: this bounds the per-line work.
    head, rest = lines[:_MAX_LINES], lines[_MAX_LINES:]
    kept, was_cut = _strip_quotes(_Lines.of(head))
    kept = _strip_signature(kept if was_cut else kept + rest)
    result = "\n".join(line.rstrip() for line in kept)
    result = _BLANK_LINES.sub("\n\n", result).strip()
    return result if result else cleaned.strip()


# ---------------------------------------------------------------------------------------
# Attachment display names

# Invisible characters that change how a name reads: bidi embeddings, overrides and
# isolates (U+202A-U+202E, U+2066-U+2069: "invoice\u202efdp.exe" shows as "invoiceexe.pdf"),
# direction marks, zero-width space and BOM.
_INVISIBLE = re.compile(r"[\u202a-\u202e\u2066-\u2069\u200b\u200e\u200f\u061c\ufeff]")
_MAX_NAME_BYTES = 255  # the usual file-system limit on a name
_MAX_EXTENSION_BYTES = 16
_EXTENSION = re.compile(r"\.[^.\s]{1,16}$")


def _truncate_utf8(text: str, limit: int) -> str:
    # Cut at a byte limit without splitting a character.
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def sanitise_filename(name: str | None, fallback: str = "attachment") -> str:
    """A safe display name for an attachment; never used to build a path.

    The last component of a path in either separator, without control characters,
    invisible direction overrides or leading dots, whitespace collapsed, at most 255 bytes
    of UTF-8 with the extension kept. Never "", "." or ".."; `fallback` (itself sanitised,
    else "attachment") stands in when nothing is left.
    """
    try:
        if not isinstance(name, str):
            raise ValueError("no name")
        cleaned = _INVISIBLE.sub("", _CONTROL.sub("", _SURROGATE.sub("\ufffd", name[:4096])))
        # Take the last non-empty component: "dir/" names "dir", not "".
        parts = [part for part in re.split(r"[/\\]", cleaned) if part.strip()]
        base = _WS.sub(" ", parts[-1] if parts else "").strip()
        # Leading dots hide a file or climb a directory; trailing dots and spaces are
        # dropped by Windows, which would show "x.exe." as "x.exe".
        base = base.lstrip(". ").rstrip(". ")
        if len(base.encode("utf-8")) > _MAX_NAME_BYTES:
            match = _EXTENSION.search(base)
            extension = match.group(0) if match else ""
            if len(extension.encode("utf-8")) > _MAX_EXTENSION_BYTES:
                extension = ""
            stem = base[: len(base) - len(extension)]
            base = _truncate_utf8(stem, _MAX_NAME_BYTES - len(extension.encode("utf-8")))
            base = base.rstrip(". ") + extension
        if base in ("", ".", ".."):
            raise ValueError("nothing left")
        return base
    except Exception:
        if fallback == "attachment":
            return "attachment"
        return sanitise_filename(fallback)
