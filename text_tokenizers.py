"""
SD3's two tokenizers, from scratch: CLIP's byte-level BPE (CLIP-L and CLIP-G share it) and T5's
SentencePiece unigram model.

    clip = CLIPTokenizer.from_files()                   the merges this project ships in assets/
    clip = CLIPTokenizer.from_files("tokenizer/")       vocab.json + merges.txt, diffusers folder
    t5 = T5Tokenizer.from_files("tokenizer_3/spiece.model")       (or tokenizer_3/tokenizer.json)
    clip(prompts, pad_id=clip.end_id)    [B, 77]: start, up to 75 tokens, end, padding
    t5(prompts, length=77)               [B, 77]: up to 76 tokens, </s>, <pad>; no start token

CLIP: NFC, white space collapsed, lower case, words split as the reference's regex does
(clip_pretokenize), each word's UTF-8 bytes merged by BPE rank. Its merges ship in assets/ (MIT,
see assets/clip_bpe_merges.LICENSE.txt); without a vocab.json the vocabulary is derived from them.

T5: spiece.model is read by a minimal protobuf reader (protobuf_fields), its precompiled nmt_nfkc
normaliser applied by CharsMap (SentencePiece's double-array trie), and each '▁'-prefixed word cut
by the most probable (Viterbi) segmentation. T5's vocabulary is not shipped: it comes from the
user's SD3 files (`tokenizer_3/spiece.model` or `tokenizer_3/tokenizer.json`).

Both give the reference implementations' ids (transformers' tokenizers, sentencepiece);
tests/test_text_encoders.py checks them on thousands of prompts when those are installed.
text_encoders.py uses these; nothing here knows about the encoders.
"""

import base64
import gzip
import json
import math
import os
import struct
import unicodedata

import torch

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CLIP_MERGES_ASSET = os.path.join(ASSETS, "clip_bpe_merges.txt.gz")
CLIP_LENGTH = 77  # CLIP's context: start + 75 tokens + end (+ padding)
T5_HELP = ("T5-XXL's SentencePiece vocabulary: pass --t5-vocab FILE, the SD3 release's "
           "tokenizer_3/spiece.model or tokenizer_3/tokenizer.json (diffusers-format folder, e.g. "
           "stabilityai/stable-diffusion-3-medium-diffusers; the same file as google/t5-v1_1-xxl's "
           "spiece.model), or put it beside the checkpoint; or leave T5 out with --no-t5")
CLIP_HELP = ("CLIP's BPE vocabulary: pass --clip-vocab with the SD3 release's tokenizer/ folder "
             "(vocab.json + merges.txt of the diffusers-format folder), or restore "
             "assets/clip_bpe_merges.txt.gz, which this project ships")


# ----------------------------------------------------------------------------------------------
# CLIP tokenizer: byte-level BPE


def bytes_to_unicode():
    """The 256 bytes -> printable characters, in vocabulary order: the printable Latin-1 bytes
    first, standing for themselves, then the other bytes in order as chr(256), chr(257), ...
    (the table GPT-2 and CLIP share; CLIP's token ids 0-255 follow this order)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table = {b: chr(b) for b in keep}
    for extra, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + extra)
    return table


# Unicode White_Space (what the reference's regex \s matches); Python's isspace() adds \x1c-\x1f
_WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                        + "".join(chr(c) for c in range(0x2000, 0x200B)))
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def _char_class(c):
    """'L' letter, 'N' number, 'W' white space, 'P' anything else (punctuation, symbols, marks)."""
    if c in _WHITESPACE:
        return "W"
    cat = unicodedata.category(c)[0]
    return cat if cat in "LN" else "P"


def _collapse_whitespace(text):
    out, prev_space = [], False
    for c in text:
        space = c in _WHITESPACE
        if not (space and prev_space):
            out.append(" " if space else c)
        prev_space = space
    return "".join(out)


def clip_pretokenize(text, specials=("<|startoftext|>", "<|endoftext|>")):
    """Normalised text -> CLIP's words: contractions ('s 't 're 've 'm 'll 'd), runs of
    letters, single digits, runs of other non-space characters; white space separates. A
    special token's text becomes '<|', its name and '|>' (the byte-level split of the reference)."""
    words, i, n = [], 0, len(text)
    while i < n:
        special = next((s for s in specials if text.startswith(s, i)), None)
        if special:
            words += [special[:2], special[2:-2], special[-2:]]
            i += len(special)
            continue
        contraction = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if contraction:
            words.append(contraction)
            i += len(contraction)
            continue
        kind = _char_class(text[i])
        j = i + 1
        if kind in "LP":
            while j < n and _char_class(text[j]) == kind:
                j += 1
        if kind != "W":
            words.append(text[i:j])
        i = j
    return words


def _split_specials(text, specials):
    """text -> [(segment, special id or None)], the special strings matched exactly, longest first."""
    parts, start, i = [], 0, 0
    order, firsts = sorted(specials, key=len, reverse=True), {s[0] for s in specials}
    while i < len(text):
        hit = next((s for s in order if text.startswith(s, i)), None) if text[i] in firsts else None
        if hit is None:
            i += 1
            continue
        if i > start:
            parts.append((text[start:i], None))
        parts.append((hit, specials[hit]))
        i = start = i + len(hit)
    if start < len(text):
        parts.append((text[start:], None))
    return parts


class CLIPTokenizer:
    """CLIP's tokenizer: NFC, white space collapsed, lower case; words as in clip_pretokenize;
    each word's UTF-8 bytes merged by BPE rank with '</w>' on its last symbol. A call gives
    [start] + the first 75 tokens + [end], padded to 77 with `pad_id` (CLIP-L: the end token,
    CLIP-G: 0)."""

    def __init__(self, merges, vocab=None, source="merges"):
        self.source = source
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        if vocab is None:  # the vocabulary OpenAI's tokenizer derives from the merges
            symbols = list(bytes_to_unicode().values())
            symbols += [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
            symbols += ["<|startoftext|>", "<|endoftext|>"]
            vocab = {s: i for i, s in enumerate(symbols)}
        missing = [s for s in ("<|startoftext|>", "<|endoftext|>") if s not in vocab]
        if missing:
            raise ValueError(f"{source}: not a CLIP vocabulary: no {missing}")
        self.vocab = vocab
        self.start_id, self.end_id = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
        self.specials = {"<|startoftext|>": self.start_id, "<|endoftext|>": self.end_id}
        self.byte_chars = bytes_to_unicode()
        self.cache = {}

    @classmethod
    def from_files(cls, path=None):
        """A folder with merges.txt (and vocab.json), a vocab.json with merges.txt beside it, or a
        merges.txt / merges.txt.gz (vocab.json beside it is used if there); None: the merges
        shipped in assets/, the vocabulary derived from them."""
        path = CLIP_MERGES_ASSET if path is None else os.fspath(path)
        if os.path.isdir(path):
            merges_file, vocab_file = (os.path.join(path, n) for n in ("merges.txt", "vocab.json"))
        elif path.endswith(".json"):
            merges_file, vocab_file = os.path.join(os.path.dirname(path), "merges.txt"), path
            if not os.path.isfile(vocab_file):
                raise FileNotFoundError(f"{vocab_file}: no such file; {CLIP_HELP}")
        else:
            merges_file, vocab_file = path, os.path.join(os.path.dirname(path), "vocab.json")
        if not os.path.isfile(merges_file):
            raise FileNotFoundError(f"{merges_file}: no such file; {CLIP_HELP}")
        opener = gzip.open if merges_file.endswith(".gz") else open
        with opener(merges_file, "rt", encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if not merges or any(len(m) != 2 for m in merges):
            raise ValueError(f"{merges_file}: not a BPE merges file (want 'left right' pairs, one a line)")
        vocab = None
        if merges_file != CLIP_MERGES_ASSET and os.path.isfile(vocab_file):
            try:
                with open(vocab_file, encoding="utf-8") as f:
                    vocab = json.load(f)
            except ValueError:
                raise ValueError(f"{vocab_file}: not a JSON vocabulary") from None
        return cls(merges, vocab, source=merges_file)

    def _bpe(self, word):
        """One word (already byte-mapped characters) -> token ids."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair = min(zip(parts, parts[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        ids = [self.vocab.get(p, self.end_id) for p in parts]  # (every merge result is in the vocab)
        self.cache[word] = ids
        return ids

    def tokens(self, text):
        """text -> ids without start, end or padding."""
        ids = []
        for segment, special in _split_specials(text, self.specials):
            if special is not None:
                ids.append(special)
                continue
            normal = _collapse_whitespace(unicodedata.normalize("NFC", segment))
            normal = "".join(c.lower() for c in normal)  # per character: no final-sigma rule
            for word in clip_pretokenize(normal):
                ids += self._bpe("".join(self.byte_chars[b] for b in word.encode("utf-8")))
        return ids

    def __call__(self, prompts, pad_id, length=CLIP_LENGTH):
        """list of prompts -> [B, length] ids."""
        out = torch.full((len(prompts), length), pad_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids = [self.start_id] + self.tokens(prompt)[:length - 2] + [self.end_id]
            out[b, :len(ids)] = torch.tensor(ids)
        return out


# ----------------------------------------------------------------------------------------------
# T5 tokenizer: SentencePiece unigram model, read from spiece.model or tokenizer.json


def _varint(buf, i):
    value, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return value, i
        shift += 7


def protobuf_fields(buf):
    """[(field number, value)] of one protobuf message: varints as int, fixed32 / fixed64 as
    raw bytes, length-delimited as bytes."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field_no, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        out.append((field_no, value))
    return out


class CharsMap:
    """SentencePiece's precompiled normaliser (nmt_nfkc for T5): a double-array trie over UTF-8
    bytes whose leaves point into a table of replacement strings. normalize() replaces, at each
    position, the longest matching prefix, and copies characters that match nothing."""

    def __init__(self, blob):
        if len(blob) < 4:
            raise ValueError("precompiled charsmap too short")
        size = int.from_bytes(blob[:4], "little")
        if size % 4 or 4 + size > len(blob):
            raise ValueError("precompiled charsmap: bad trie size")
        trie = blob[4:4 + size]
        self.units = [int.from_bytes(trie[i:i + 4], "little") for i in range(0, size, 4)]
        self.strings = blob[4 + size:]

    def _longest(self, data, start):
        """(length, value) of the longest rule matching data[start:], or (0, 0)."""
        units, best = self.units, (0, 0)
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)                 # root offset
        for i in range(start, len(data)):
            node ^= data[i]
            if node >= len(units):
                break
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != data[i]:                    # label check
                break
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:                                         # has a leaf
                best = (i + 1 - start, units[node] & ((1 << 31) - 1))
        return best

    def normalize(self, text):
        data, out, i = text.encode("utf-8"), [], 0
        while i < len(data):
            length, value = self._longest(data, i)
            if length:
                end = self.strings.find(b"\0", value)
                out.append(self.strings[value:end if end >= 0 else len(self.strings)])
                i += length
            else:
                n = 1 if data[i] < 0xC0 else 2 if data[i] < 0xE0 else 3 if data[i] < 0xF0 else 4
                out.append(data[i:i + n])
                i += n
        return b"".join(out).decode("utf-8", errors="replace")


class T5Tokenizer:
    """T5's SentencePiece unigram tokenizer: the precompiled normaliser, words split at white
    space and each prefixed with '▁', each word cut into pieces by the most probable (Viterbi)
    segmentation; a character no piece covers is <unk>, and runs of them one <unk>. A call
    gives the first length-1 ids + [</s>], padded to `length` with <pad>; no start token."""

    def __init__(self, pieces, unk_id, charsmap=None, specials=None, source="pieces"):
        self.source = source
        self.pieces = {}
        for i, (piece, score) in enumerate(pieces):
            self.pieces.setdefault(piece, (i, score))
        self.max_len = max(len(p) for p, _ in pieces)
        self.unk_id = unk_id
        self.unk_score = min(score for _, score in pieces) - 10.0
        self.charsmap = charsmap
        self.specials = dict(specials or {})
        self.eos_id = self.specials.get("</s>", self.pieces.get("</s>", (1,))[0])
        self.pad_id = self.specials.get("<pad>", self.pieces.get("<pad>", (0,))[0])
        self.cache = {}

    # -- files

    @classmethod
    def from_files(cls, path):
        """spiece.model, tokenizer.json, or a folder holding either (spiece.model first)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            found = [os.path.join(path, n) for n in ("spiece.model", "tokenizer.json")
                     if os.path.isfile(os.path.join(path, n))]
            if not found:
                raise FileNotFoundError(f"{path}: no spiece.model or tokenizer.json in this folder; "
                                        f"{T5_HELP}")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file; {T5_HELP}")
        try:
            if path.endswith(".json"):
                return cls._from_tokenizer_json(path)
            return cls._from_spiece(path)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise ValueError(f"{path}: not a T5 SentencePiece unigram vocabulary ({e}); {T5_HELP}") from None

    @classmethod
    def _from_spiece(cls, path):
        with open(path, "rb") as f:
            fields = protobuf_fields(f.read())
        pieces, types, charsmap, model_type = [], [], None, 1
        for no, value in fields:
            if no == 1:                                   # SentencePiece {piece, score, type}
                sub = dict(protobuf_fields(value))
                score = struct.unpack("<f", sub.get(2, bytes(4)))[0]
                pieces.append((sub[1].decode("utf-8"), score))
                types.append(sub.get(3, 1))
            elif no == 2:                                 # TrainerSpec
                spec = dict(protobuf_fields(value))
                model_type = spec.get(3, 1)
            elif no == 3:                                 # NormalizerSpec
                blob = dict(protobuf_fields(value)).get(2)
                charsmap = CharsMap(blob) if blob else None
        if not pieces:
            raise ValueError("no pieces")
        if model_type != 1:
            raise ValueError(f"model type {model_type}, not unigram (1)")
        unk_id = types.index(2) if 2 in types else 2      # the piece of type UNKNOWN
        n = len(pieces)                                   # T5's 100 sentinels follow the pieces
        specials = {p: i for i, (p, _) in enumerate(pieces) if types[i] == 3 or p == "<unk>"}
        specials.update({f"<extra_id_{k}>": n + 99 - k for k in range(100)})
        return cls(pieces, unk_id, charsmap, specials, source=path)

    @classmethod
    def _from_tokenizer_json(cls, path):
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        model = spec["model"]
        if model.get("type") != "Unigram":
            raise ValueError(f"model type {model.get('type')!r}, not Unigram")
        pieces = [(p, float(s)) for p, s in model["vocab"]]
        blobs = []

        def walk(norm):
            if not norm:
                return
            if norm["type"] == "Sequence":
                for sub in norm["normalizers"]:
                    walk(sub)
            elif norm["type"] == "Precompiled":
                blobs.append(base64.b64decode(norm["precompiled_charsmap"]))
            elif norm["type"] == "Replace":  # only white space collapsing: words split there anyway
                pattern = "".join(str(v) for v in norm["pattern"].values())
                if norm["content"].strip() or set(pattern) - set(" {},0123456789+"):
                    raise ValueError(f"unsupported Replace normalizer {norm}")
            elif norm["type"] != "Strip":
                raise ValueError(f"unsupported normalizer {norm['type']!r}")
        walk(spec.get("normalizer"))
        specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        unk_id = model.get("unk_id")
        return cls(pieces, 2 if unk_id is None else unk_id, CharsMap(blobs[0]) if blobs else None,
                   specials, source=path)

    # -- encoding

    def _viterbi(self, word):
        """One '▁'-prefixed word -> ids of its most probable segmentation."""
        if word in self.cache:
            return self.cache[word]
        n = len(word)
        best = [(-math.inf, 0, 0)] * (n + 1)               # (score, start, id) of the best path to i
        best[0] = (0.0, 0, 0)
        for start in range(n):
            base, single = best[start][0], False
            for end in range(start + 1, min(n, start + self.max_len) + 1):
                hit = self.pieces.get(word[start:end])
                if hit is None:
                    continue
                single |= end == start + 1
                if base + hit[1] > best[end][0]:
                    best[end] = (base + hit[1], start, hit[0])
            if not single and base + self.unk_score > best[start + 1][0]:
                best[start + 1] = (base + self.unk_score, start, self.unk_id)
        ids, end = [], n
        while end > 0:
            _, start, piece_id = best[end]
            if not (piece_id == self.unk_id and ids and ids[-1] == self.unk_id):  # fuse <unk> runs
                ids.append(piece_id)
            end = start
        ids.reverse()
        self.cache[word] = ids
        return ids

    def tokens(self, text):
        """text -> ids without </s> or padding."""
        ids = []
        for segment, special in _split_specials(text, self.specials):
            if special is not None:
                ids.append(special)
                continue
            normal = self.charsmap.normalize(segment) if self.charsmap else segment
            for word in "".join(" " if c in _WHITESPACE else c for c in normal).split(" "):
                if not word:
                    continue
                word = word if word.startswith("▁") else "▁" + word
                for piece in word.replace("▁", " ▁").split(" "):  # a new piece at every '▁'
                    if piece:
                        ids += self._viterbi(piece)
        return ids

    def __call__(self, prompts, length=77):
        """list of prompts -> [B, length] ids: tokens cut to length - 1, then </s>, then <pad>."""
        out = torch.full((len(prompts), length), self.pad_id, dtype=torch.long)
        for b, prompt in enumerate(prompts):
            ids = self.tokens(prompt)[:length - 1] + [self.eos_id]
            out[b, :len(ids)] = torch.tensor(ids)
        return out
