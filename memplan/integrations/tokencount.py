"""Token counts of many texts: exactly the tokenizer's, several times faster than encoding them.

`tokenizers` spends most of an encode on bookkeeping memplan does not need (offsets and alignments for every byte,
token strings, the Encoding objects): on a 2-core machine it tokenizes about 5 MB of text per second. memplan needs
only the lengths. For the byte-level BPE tokenizers of GPT-2, Llama 3, Qwen 2/2.5/3, Mistral-Nemo and most recent
models, a text's length is a sum over its pieces, so it is counted here the way the tokenizer builds it
(tokenizers/src/tokenizer/{added_vocabulary,mod}.rs, pre_tokenizers/{byte_level,split}.rs, models/bpe/model.rs,
tokenizers 0.23):

1. added tokens (`<|im_start|>`, `<s>`, ...) are cut out first, leftmost-longest, one token each;
2. each remaining segment is normalized (none, or NFC) and split by the pre-tokenizer's regex into pieces
   (matches and the gaps between them: SplitDelimiterBehavior::Isolated);
3. each piece is mapped to byte-level characters and tokenized by the BPE model alone: a piece's count never
   depends on its neighbours, so it is memoized (real text repeats its words);
4. the post-processor adds its special tokens (`num_special_tokens_to_add`).

The regex runs in Python's `re` on ASCII text (the pattern rewritten with ASCII classes, which match exactly what
`\\p{L}`, `\\p{N}`, `\\s` match on ASCII input), and in the `regex` module (Unicode classes, as Oniguruma) on other
text when it is installed, else such texts go to the tokenizer.

The SentencePiece-converted BPE tokenizers of Llama 2, Mistral, Gemma and Phi-3 (transformers
convert_slow_tokenizer.py: LlamaConverter, GemmaConverter) have no regex: spaces become the metaspace `▁`
(normalizers/replace.rs, or pre_tokenizers/metaspace.rs), a prefix metaspace is added (normalizers/prepend.rs on
every segment between added tokens; Metaspace's prepend_scheme always / first), and the BPE runs on the whole
segment. A merge then could join any two neighbours; but SentencePiece's trainer makes no token with a character
before a metaspace (words start at a metaspace, whitespace runs stay whole), and every merge of the file is checked
for one (if any, the tokenizer counts). Without such a merge the segment splits into pieces (a metaspace run and the
characters up to the next metaspace) that the BPE tokenizes apart, memoized the same way.

Tokenizers of any other shape (WordPiece, Unigram, a normalizer other than NFC, added tokens that strip spaces,
truncation or padding set in tokenizer.json) are encoded by the tokenizer itself (`encode_batch_fast`).

Checked, not assumed: the first batch, and one row in eight of batches 2, 4, 8, 16, ..., are also encoded by the
tokenizer; a single difference raises `Mismatch` and the caller counts the whole file again with the tokenizer.
"""
from __future__ import annotations

import json
import re

# tokenizers/src/pre_tokenizers/byte_level.rs: the GPT-2 split of ByteLevel(use_regex=true)
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
META = "\u2581"  # SentencePiece's metaspace, the space of Llama 2, Mistral and Gemma vocabularies
MEMO_LIMIT = 4_000_000  # pieces remembered (a few hundred MB at most); the memo restarts past it


class Mismatch(Exception):
    """The piece count disagreed with the tokenizer on a checked batch."""


def _byte_chars() -> dict[int, str]:
    """GPT-2's bytes_to_unicode (tokenizers byte_level.rs bytes_char): printable bytes map to themselves."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


BYTE_TABLE = str.maketrans(_byte_chars())  # applied to a piece's UTF-8 bytes decoded as latin-1

_SPACE = r"\t\n\x0b\x0c\r "  # Unicode White_Space within ASCII (Python's \s also takes \x1c-\x1f: not used)
_CLASS = {r"\p{L}": "A-Za-z", r"\p{N}": "0-9", r"\s": _SPACE}


def ascii_pattern(pattern: str) -> re.Pattern | None:
    """`pattern` (Oniguruma syntax) for ASCII-only input in Python's `re`, or None when it uses a construct this
    rewrite does not know. On ASCII text \\p{L} is A-Za-z, \\p{N} 0-9, \\s the six ASCII White_Space characters;
    \\d and \\w already mean 0-9 and [A-Za-z0-9_] there."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            tok = pattern[i:i + 5] if pattern.startswith(("\\p{", "\\P{"), i) else pattern[i:i + 2]
            if tok in _CLASS:
                out.append(_CLASS[tok] if in_class else f"[{_CLASS[tok]}]")
            elif tok == r"\S" and not in_class:
                out.append(f"[^{_SPACE}]")
            elif tok[1:2] in ("p", "P", "S", "h", "H", "R", "X", "K", "G") or (tok[1:2] in "sS" and in_class):
                return None
            else:
                out.append(tok)
            i += len(tok)
            continue
        if c == "[" and not in_class:
            in_class = True
            out.append(c)
            if pattern.startswith("[^", i):
                out.append("^")
                i += 1
            if pattern.startswith("]", i + 1):  # a literal ] first in a class
                out.append("\\]")
                i += 1
        elif c == "]" and in_class:
            in_class = False
            out.append(c)
        elif c == "[" and in_class:
            return None  # nested classes / POSIX brackets
        else:
            out.append(c)
        i += 1
    try:
        return re.compile("".join(out))
    except re.error:
        return None


class TokenCounter:
    """len(tokenizer.encode(text, add_special_tokens=...).ids) for many texts (see the module docstring)."""

    def __init__(self, tok):
        self.tok = tok
        self.batches = 0
        self.fast = False
        self.kind = ""  # what the pieces are of, when counted by pieces
        self.why_slow = ""
        try:
            self._setup()
        except _Unsupported as e:
            self.why_slow = str(e)

    # ---- what the tokenizer is
    def _setup(self) -> None:
        tok = self.tok
        spec = json.loads(tok.to_str())
        if tok.truncation or tok.padding or getattr(tok, "encode_special_tokens", False):
            raise _Unsupported("truncation, padding or encode_special_tokens is set")
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or model.get("dropout"):
            raise _Unsupported(f"model {model.get('type')} (the piece count covers BPE without dropout)")
        added = spec.get("added_tokens") or []
        if any(a.get("lstrip") or a.get("rstrip") or a.get("single_word") for a in added):
            raise _Unsupported("added tokens that strip spaces or match single words")
        contents = sorted({a["content"] for a in added if a.get("content")}, key=len, reverse=True)
        # leftmost-longest, as the Aho-Corasick matcher of added_vocabulary.rs
        self.added_re = re.compile("(" + "|".join(map(re.escape, contents)) + ")") if contents else None
        self.special = tok.num_special_tokens_to_add(False)
        self.metaspace = _metaspace_shape(spec)
        if self.metaspace is not None:
            if any(a.get("normalized") for a in added):
                raise _Unsupported("added tokens matched on the normalized text")
            if model.get("ignore_merges") or model.get("continuing_subword_prefix") or model.get(
                    "end_of_word_suffix"):
                raise _Unsupported("a BPE with ignore_merges or word affixes on the whole string")
            _check_no_merge_across_spaces(model)
            self.kind = "SentencePiece-style BPE"
            self.piece_re = re.compile(f"{META}[^{META}]*|[^{META}]+" if self.metaspace[1] else
                                       f"{META}*[^{META}]+|{META}+")
            self.memo = _MetaspaceMemo(tok.model)
            self.pieces = self._metaspace_pieces
            self.fast = True
            return
        norm = spec.get("normalizer")
        if norm is not None and norm.get("type") != "NFC":
            raise _Unsupported(f"normalizer {norm.get('type')}")
        self.nfc = norm is not None
        pattern = _byte_level_pattern(spec.get("pre_tokenizer"))
        if pattern is None:
            raise _Unsupported("the pre-tokenizer is neither a byte-level regex split nor a metaspace")
        self.ascii_re = ascii_pattern(pattern)
        if self.ascii_re is None:
            raise _Unsupported(f"pre-tokenizer pattern {pattern!r}")
        try:
            import regex

            self.unicode_re = regex.compile(pattern)
        except Exception:  # noqa: BLE001 - regex not installed, or a pattern it rejects: the tokenizer counts those
            self.unicode_re = None
        self.kind = "byte-level BPE"
        self.memo = _Memo(tok.model)
        self.pieces = self._pieces
        self.fast = True

    # ---- counting
    def count(self, texts: list[str], add_special_tokens: bool) -> list[int]:
        self.batches += 1
        if not self.fast:
            return self._encode(texts, add_special_tokens)
        extra = self.special if add_special_tokens else 0
        out: list[int] = []
        slow: list[int] = []  # positions the tokenizer counts (non-ASCII text without the regex module)
        piece = self.pieces
        for i, text in enumerate(texts):
            n = piece(text)
            if n is None:
                slow.append(i)
                out.append(0)
            else:
                out.append(n + extra)
        if slow:
            for i, n in zip(slow, self._encode([texts[i] for i in slow], add_special_tokens)):
                out[i] = n
        b = self.batches
        if b & (b - 1) == 0:  # batches 1, 2, 4, 8, ... checked against the tokenizer: all of the first, then 1 in 8
            step = 1 if b == 1 else 8
            want = self._encode(texts[::step], add_special_tokens)
            for k, (got, w) in enumerate(zip(out[::step], want)):
                if got != w:
                    raise Mismatch(f"batch {b}, row {k * step + 1}: {got} counted, the tokenizer gives {w}")
        return out

    def _segments(self, text: str) -> tuple[int, list[tuple[int, str]]]:
        """(the added tokens in `text`, one token each; the non-empty runs of text between them, each with its
        index in the split: 0 only for a run at the start of the text)."""
        if self.added_re is None:
            return 0, [(0, text)] if text else []
        parts = self.added_re.split(text)
        return len(parts) // 2, [(k, seg) for k, seg in enumerate(parts) if not k % 2 and seg]

    def _pieces(self, text: str) -> int | None:
        memo = self.memo
        total, segments = self._segments(text)
        for _, seg in segments:
            if seg.isascii():
                pieces = self.ascii_re.findall(seg)
            else:
                if self.unicode_re is None:
                    return None
                if self.nfc:
                    import unicodedata

                    seg = unicodedata.normalize("NFC", seg)
                pieces = self.unicode_re.findall(seg)
            both = sum(map(memo.__getitem__, pieces))  # (characters << 32) + tokens, summed in one pass
            if both >> 32 != len(seg):  # gaps between matches are pieces too: leave those to the tokenizer
                return None
            total += both & 0xFFFFFFFF
        return total

    def _metaspace_pieces(self, text: str) -> int:
        """Tokens of `text` under a SentencePiece-style BPE: per segment between added tokens, spaces become the
        metaspace, the prefix metaspace is added as the normalizer (Prepend: any non-empty segment) or the
        Metaspace pre-tokenizer (always / first: unless the segment starts with one; first: only at offset 0)
        adds it, and the string splits into pieces that no merge can join (_check_no_merge_across_spaces)."""
        memo, prepend = self.memo, self.metaspace[0]
        total, segments = self._segments(text)
        for k, seg in segments:
            seg = seg.replace(" ", META)
            if prepend == "normalizer":  # Prepend: on every non-empty segment
                seg = META + seg
            elif (prepend == "always" or (prepend == "first" and k == 0)) and seg[0] != META:
                seg = META + seg
            total += sum(map(memo.__getitem__, self.piece_re.findall(seg)))
        return total

    def _encode(self, texts: list[str], add_special_tokens: bool) -> list[int]:
        return [len(e.ids) for e in self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)]


class _Unsupported(Exception):
    pass


class _Memo(dict):
    """piece -> (its length in characters << 32) + its BPE token count (the model alone, on the piece's byte-level
    characters): one sum over a text's pieces gives its tokens and how much of it the pieces cover."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, piece: str) -> int:
        if len(self) >= MEMO_LIMIT:
            self.clear()
        tokens = len(self.model.tokenize(piece.encode("utf-8").decode("latin-1").translate(BYTE_TABLE)))
        n = self[piece] = (len(piece) << 32) + tokens
        return n


class _MetaspaceMemo(dict):
    """piece -> its BPE token count (the model alone; byte fallback and unknown tokens as the model makes them)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, piece: str) -> int:
        if len(self) >= MEMO_LIMIT:
            self.clear()
        n = self[piece] = len(self.model.tokenize(piece))
        return n


def _metaspace_shape(spec: dict) -> tuple[str, bool] | None:
    """(how the prefix metaspace is added, whether the pre-tokenizer splits at each metaspace) for the two shapes
    of SentencePiece-converted BPE tokenizers (transformers convert_slow_tokenizer.py), else None:
    - normalizer Replace(" ", META), with Prepend(META) for Llama 2 / Mistral (legacy) or without it (Gemma),
      pre-tokenizer none or Gemma's Split(" "), a no-op once the spaces are replaced: ("normalizer" | "never", False);
    - no normalizer, pre-tokenizer Metaspace(META, prepend_scheme, split) (Llama non-legacy): (scheme, split)."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if norm is None:
        if not isinstance(pre, dict) or pre.get("type") != "Metaspace" or pre.get("replacement") != META:
            return None
        scheme = pre.get("prepend_scheme") or ("never" if pre.get("add_prefix_space") is False else "always")
        return (scheme, pre.get("split", True)) if scheme in ("always", "first", "never") else None
    steps = norm.get("normalizers") if norm.get("type") == "Sequence" else [norm]
    kinds = [n.get("type") for n in steps or []]
    replace = [n for n in steps or [] if n.get("type") == "Replace"]
    prepend = [n for n in steps or [] if n.get("type") == "Prepend"]
    if sorted(kinds) not in (["Replace"], ["Prepend", "Replace"]) or replace[0].get("pattern") != {"String": " "} \
            or replace[0].get("content") != META or any(n.get("prepend") != META for n in prepend):
        return None
    if pre is not None and not (pre.get("type") == "Split" and pre.get("pattern") == {"String": " "}):
        return None
    return ("normalizer" if prepend else "never", False)


def _check_no_merge_across_spaces(model: dict) -> None:
    """A SentencePiece-style BPE runs on the whole segment; its pieces (a metaspace run and the characters up to the
    next metaspace) can be counted apart only if no merge makes a token with a character before a metaspace.
    SentencePiece's trainer never makes one (words start at a metaspace; whitespace-only pieces stay whole), and
    the converted merges only join two halves of a vocabulary token: checked here on every merge."""
    merges = model.get("merges") or []
    bad = re.compile(f"[^{META}]{META}")
    for m in merges:
        a, b = m if isinstance(m, list) else m.split(" ", 1)
        if bad.search(a + b):
            raise _Unsupported(f"the merge {a!r} + {b!r} joins across a metaspace")
    if META not in (model.get("vocab") or {}):
        raise _Unsupported("the metaspace is not in the vocabulary")


def _byte_level_pattern(pre) -> str | None:
    """The one regex of ByteLevel(use_regex=true), or of Split(Regex, Isolated) + ByteLevel(use_regex=false);
    None for any other pre-tokenizer."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "ByteLevel":
        return GPT2_PATTERN if pre.get("use_regex", True) and not pre.get("add_prefix_space") else None
    if pre.get("type") != "Sequence":
        return None
    parts = pre.get("pretokenizers") or []
    if len(parts) != 2:
        return None
    split, level = parts
    if (split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert")
            or not isinstance(split.get("pattern"), dict) or "Regex" not in split["pattern"]):
        return None
    if level.get("type") != "ByteLevel" or level.get("use_regex", True) or level.get("add_prefix_space"):
        return None
    return split["pattern"]["Regex"]
