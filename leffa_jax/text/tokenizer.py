"""The CLIP byte-level BPE tokenizer, pure Python (no torch, no transformers).

Reads a diffusers `tokenizer/` (or `tokenizer_2/`) folder: `vocab.json`, `merges.txt`,
`tokenizer_config.json` and, when present, `special_tokens_map.json`. The ids are those of
transformers' `CLIPTokenizer` (5.x, the `tokenizers`-backed one; tests/test_tokenizer.py checks
>= 100 prompts against it). Pipeline, as transformers builds it:

1. added tokens (bos, eos, unk, pad, `added_tokens_decoder`) are split out of the text first,
   leftmost-longest; ones marked `normalized` are matched after step 2. So SDXL's second
   tokenizer, whose pad token is `!`, turns every `!` in a prompt into id 0, as transformers does;
2. each remaining piece: NFC, runs of whitespace -> one space, per-character lowercase;
3. split by the CLIP pattern, then by GPT-2's byte-level pattern, bytes -> unicode symbols;
4. BPE with `</w>` ending each word, then `[bos] + ids + [eos]`, truncated to `max_length`
   (content cut to `max_length - 2`) and padded on the right with the folder's pad token.

transformers 4.x without ftfy used a slightly different clean-up (BasicTokenizer: control
characters dropped, spaces around CJK characters); 5.x, matched here, does neither.
"""

from __future__ import annotations

import functools
import json
import os
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import regex

# transformers' CLIPTokenizer split pattern, then ByteLevel's (GPT-2) pattern on each piece.
_CLIP_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_BYTE_LEVEL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
_WHITESPACE = regex.compile(r"\s+")
_END_OF_WORD = "</w>"


class TokenizerError(ValueError):
    """A tokenizer folder that cannot be read (names the file and the problem)."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


def _read_json(folder: str, name: str, required: bool) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        if required:
            raise TokenizerError(f"tokenizer file missing: {path} (expected a diffusers "
                                 "tokenizer folder with vocab.json, merges.txt, tokenizer_config.json)")
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def _token_content(value) -> str | None:
    """A special-token entry: a string or an AddedToken dict -> its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    raise TokenizerError(f"cannot read special token entry {value!r}")


class AddedToken:
    """One added/special token: text, id and the matching flags transformers keeps."""

    def __init__(self, content: str, token_id: int, *, normalized: bool = False,
                 lstrip: bool = False, rstrip: bool = False):
        self.content, self.id = content, token_id
        self.normalized, self.lstrip, self.rstrip = normalized, lstrip, rstrip


class CLIPTokenizer:
    """CLIP BPE tokenizer. `tokenizer(prompts)` -> {"input_ids", "attention_mask"} (B, L) int64."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 bos_token: str, eos_token: str, unk_token: str, pad_token: str,
                 model_max_length: int = 77, added_tokens: Sequence[AddedToken] = ()):
        self.encoder = dict(vocab)
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.merge_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.model_max_length = int(model_max_length)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.added_tokens = list(added_tokens)
        self.tokens_to_ids = {t.content: t.id for t in self.added_tokens}
        self.tokens_to_ids.update((s, self._vocab_id(s)) for s in (bos_token, eos_token, unk_token,
                                                                   pad_token) if s not in self.tokens_to_ids)
        self.bos_token_id = self.tokens_to_ids[bos_token]
        self.eos_token_id = self.tokens_to_ids[eos_token]
        self.unk_token_id = self.tokens_to_ids[unk_token]
        self.pad_token_id = self.tokens_to_ids[pad_token]
        self.pad_token = pad_token
        self._raw_split = self._added_pattern([t for t in self.added_tokens if not t.normalized])
        self._normalized_split = self._added_pattern([t for t in self.added_tokens if t.normalized])
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_word)

    def _vocab_id(self, token: str) -> int:
        if token not in self.encoder:
            raise TokenizerError(f"special token {token!r} is not in the vocabulary")
        return self.encoder[token]

    @staticmethod
    def _added_pattern(tokens: Sequence[AddedToken]):
        """Regex matching any of `tokens`, longest first (leftmost-longest), with lstrip/rstrip."""
        if not tokens:
            return None
        ordered = sorted(tokens, key=lambda t: -len(t.content))
        parts = [(r"\s*" if t.lstrip else "") + f"(?P<t{k}>{regex.escape(t.content)})"
                 + (r"\s*" if t.rstrip else "") for k, t in enumerate(ordered)]
        return regex.compile("|".join(parts)), [t.id for t in ordered]

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> CLIPTokenizer:
        """Read a tokenizer folder (vocab.json, merges.txt, tokenizer_config.json)."""
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise TokenizerError(f"tokenizer folder not found: {folder}")
        vocab = _read_json(folder, "vocab.json", True)
        config = _read_json(folder, "tokenizer_config.json", True)
        special_map = _read_json(folder, "special_tokens_map.json", False)
        merges_path = os.path.join(folder, "merges.txt")
        if not os.path.exists(merges_path):
            raise TokenizerError(f"tokenizer file missing: {merges_path}")
        with open(merges_path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:] if line.strip()]
        if lines and not lines[0].startswith("#version"):
            merges.insert(0, tuple(lines[0].split()))
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise TokenizerError(f"{merges_path}: malformed merge line {' '.join(bad[0])!r}")
        if config.get("tokenizer_class", "CLIPTokenizer") not in ("CLIPTokenizer", "CLIPTokenizerFast"):
            raise TokenizerError(f"{folder}: tokenizer_class is {config['tokenizer_class']!r}, "
                                 "expected CLIPTokenizer")
        names = {}
        for key, default in (("bos_token", "<|startoftext|>"), ("eos_token", "<|endoftext|>"),
                             ("unk_token", "<|endoftext|>"), ("pad_token", "<|endoftext|>")):
            names[key] = _token_content(config.get(key, special_map.get(key, default)))
        added = _added_tokens(config, special_map, names, vocab, folder)
        return cls(vocab, merges, model_max_length=min(int(config.get("model_max_length", 77)), 2**31),
                   added_tokens=added, **names)

    # ------------------------------------------------------------------ encoding

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        """BPE of one byte-mapped word: lowest-rank adjacent pair merged first, all occurrences."""
        symbols = list(word[:-1]) + [word[-1] + _END_OF_WORD]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:], strict=False)}
            best = min(pairs, key=lambda p: self.merge_ranks.get(p, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    @staticmethod
    def normalize(text: str) -> str:
        """NFC, whitespace runs -> " ", per-character lowercase (as the `tokenizers` normalizer)."""
        text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
        return "".join(c.lower() for c in text)

    def _split_added(self, text: str, pattern) -> list[str | int]:
        """Split `text` at added tokens: plain substrings and token ids, in order."""
        if pattern is None or not text:
            return [text]
        compiled, ids = pattern
        out: list[str | int] = []
        start = 0
        for m in compiled.finditer(text):
            out.append(text[start:m.start()])
            out.append(ids[int(m.lastgroup[1:])])
            start = m.end()
        out.append(text[start:])
        return out

    def _encode_piece(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _CLIP_PATTERN.findall(text):
            for word in _BYTE_LEVEL_PATTERN.findall(piece):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder.get(t, self.unk_token_id) for t in self._bpe(mapped))
        return ids

    def tokenize(self, text: str) -> list[str]:
        """Text -> BPE token strings (no bos/eos)."""
        return [self.decoder[i] for i in self.encode(text, add_special_tokens=False)]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids, `[bos] + ids + [eos]` unless add_special_tokens=False. No truncation."""
        ids: list[int] = []
        for raw in self._split_added(text, self._raw_split):
            if isinstance(raw, int):
                ids.append(raw)
                continue
            for part in self._split_added(self.normalize(raw), self._normalized_split):
                ids.extend([part] if isinstance(part, int) else self._encode_piece(part))
        return [self.bos_token_id, *ids, self.eos_token_id] if add_special_tokens else ids

    def __call__(self, text: str | Sequence[str], *, padding: str | bool = "max_length",
                 max_length: int | None = None, truncation: bool = True) -> dict[str, np.ndarray]:
        """Batch encode like `tokenizer(text, padding=..., max_length=..., truncation=...,
        return_tensors="np")`: {"input_ids", "attention_mask"} int64 (B, L).

        padding: "max_length" (to max_length, default the folder's model_max_length = 77),
        "longest" / True (to the longest in the batch), False / "do_not_pad" (lengths must agree).
        """
        texts = [text] if isinstance(text, str) else list(text)
        max_length = self.model_max_length if max_length is None else int(max_length)
        if truncation and max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for bos and eos")
        rows = []
        for t in texts:
            ids = self.encode(t, add_special_tokens=False)
            if truncation:
                ids = ids[:max_length - 2]
            rows.append([self.bos_token_id, *ids, self.eos_token_id])
        if padding == "max_length":
            width = max(max_length, *(len(r) for r in rows)) if rows else max_length
        elif padding in (True, "longest"):
            width = max((len(r) for r in rows), default=0)
        elif padding in (False, "do_not_pad"):
            width = max((len(r) for r in rows), default=0)
            if any(len(r) != width for r in rows):
                raise ValueError("sequences of different lengths without padding; use padding='longest'")
        else:
            raise ValueError(f"unknown padding {padding!r}; choose 'max_length', 'longest' or False")
        input_ids = np.full((len(rows), width), self.pad_token_id, np.int64)
        attention_mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            input_ids[i, :len(r)] = r
            attention_mask[i, :len(r)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Ids -> text (byte-level decoded, `</w>` as spaces)."""
        special = {self.bos_token_id, self.eos_token_id, self.pad_token_id, self.unk_token_id}
        tokens = [self.decoder[int(i)] for i in ids if not (skip_special_tokens and int(i) in special)]
        data = bytearray()
        for tok in tokens:
            data.extend(self.byte_decoder.get(c, ord("?")) for c in tok)
        return data.decode("utf-8", errors="replace").replace(_END_OF_WORD, " ").strip()


def _added_tokens(config: dict, special_map: dict, names: dict[str, str], vocab: dict[str, int],
                  folder: str) -> list[AddedToken]:
    """Added tokens as transformers registers them: the file's `added_tokens_decoder` (flags as
    stored), else the special tokens (bos/eos/unk/pad + additional), never normalized."""
    decoder = config.get("added_tokens_decoder")
    if decoder:
        tokens = []
        for token_id, entry in decoder.items():
            if entry.get("single_word"):
                raise TokenizerError(f"{folder}: added token {entry['content']!r} has "
                                     "single_word=true, which this tokenizer does not support")
            tokens.append(AddedToken(entry["content"], int(token_id),
                                     normalized=bool(entry.get("normalized", False)),
                                     lstrip=bool(entry.get("lstrip")), rstrip=bool(entry.get("rstrip"))))
        known = {t.content for t in tokens}
    else:
        tokens, known = [], set()
    extra = config.get("additional_special_tokens", special_map.get("additional_special_tokens", []))
    for content in [*names.values(), *map(_token_content, extra)]:
        if content in known:
            continue
        if content not in vocab:
            raise TokenizerError(f"{folder}: special token {content!r} is not in vocab.json")
        tokens.append(AddedToken(content, vocab[content]))
        known.add(content)
    return tokens
