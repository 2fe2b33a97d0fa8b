"""The CLIP byte-level BPE tokenizer SD v1 conditions on, written out here so that training and
sampling do not depend on a third-party tokenizer's version-dependent clean-up or padding.

Behaviour follows OpenAI CLIP's `SimpleTokenizer` (ftfy + double html.unescape clean-up, the same
split regex and merges), with SD v1's framing: [BOS] + at most 75 ids + [EOS], padded with EOS
(the `padding="max_length"` of transformers' tokenizer in CompVis' FrozenCLIPEmbedder).
The only external input is the merges file shipped inside open_clip (`bpe_simple_vocab_16e6.txt.gz`).
"""
from __future__ import annotations

import gzip
import html
import importlib.util
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP keeps the first 48894 merges of the file
CONTEXT_LENGTH = 77
# The cache keeps BPE results of words seen so far; the caption vocabulary of a long run is large,
# so it is dropped (not evicted one by one, which would cost more bookkeeping than it saves) when full.
_CACHE_LIMIT = 1 << 20


def default_vocab_path() -> Path:
    """The merges file inside the installed open_clip package (found without importing open_clip,
    which would pull in timm and the whole model zoo)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed; pass the path of {VOCAB_FILE} explicitly")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the open_clip package; pass the path of {VOCAB_FILE} explicitly")
    return path


@lru_cache()
def bytes_to_unicode() -> dict[int, str]:
    """Maps each byte to a printable unicode character, so BPE never sees whitespace or control
    characters: printable latin-1 bytes map to themselves, the other 68 to chr(256 + n)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    # Exactly CLIP's basic_clean + whitespace_clean + lower: fix mojibake and strip control
    # characters (ftfy), decode entities twice (LAION alt-texts are often double-escaped).
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


class CLIPTokenizer:
    def __init__(self, vocab_path: str | os.PathLike | None = None):
        path = Path(vocab_path) if vocab_path is not None else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        # Line 0 is a "#version" header; the file holds more merges than CLIP's vocabulary uses.
        self.merges: list[tuple[str, str]] = [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]]
        if len(self.merges) != NUM_MERGES or any(len(m) != 2 for m in self.merges):
            raise ValueError(f"{path}: expected {NUM_MERGES} merges of two symbols each")

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        byte_symbols = list(self.byte_encoder.values())
        vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in self.merges] + [BOS_TOKEN, EOS_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks = {m: i for i, m in enumerate(self.merges)}
        self.bos_id, self.eos_id = self.encoder[BOS_TOKEN], self.encoder[EOS_TOKEN]
        self.pad_id = self.eos_id  # SD v1 pads with EOS (open_clip pads with 0)
        # A literal "<|endoftext|>" in a caption stays one special token, as in CLIP.
        self._cache: dict[str, str] = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}
        specials = "|".join(regex.escape(t) for t in (BOS_TOKEN, EOS_TOKEN))
        self._pattern = regex.compile(
            specials + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one pre-token (already byte-mapped); the last symbol
        carries the end-of-word marker '</w>'."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        # Greedy BPE: repeatedly merge every occurrence of the lowest-ranked adjacent pair.
        while len(word) > 1:
            pairs = set(zip(word, word[1:]))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        result = " ".join(word)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache = {BOS_TOKEN: BOS_TOKEN, EOS_TOKEN: EOS_TOKEN}
        self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self.bpe(mapped).split(" "))
        return ids

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor [B, context_length]: BOS, ids truncated to context_length - 2, EOS, then EOS padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.full((len(texts), context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id] + self.encode(text)[:context_length - 2] + [self.eos_id]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        specials = (self.bos_id, self.eos_id) if skip_special_tokens else ()
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in specials)
        # Special tokens are not byte-mapped; keep them verbatim when they are not skipped.
        parts = regex.split(f"({regex.escape(BOS_TOKEN)}|{regex.escape(EOS_TOKEN)})", text)
        out = []
        for part in parts:
            if part in (BOS_TOKEN, EOS_TOKEN):
                out.append(part + " ")
            else:
                out.append(bytearray(self.byte_decoder[c] for c in part).decode("utf-8", errors="replace"))
        return "".join(out).replace("</w>", " ").strip()

    def write_hf_files(self, directory: str | os.PathLike) -> Path:
        """Writes the `tokenizer/` folder of a diffusers pipeline, loadable with transformers'
        `CLIPTokenizer.from_pretrained(directory)`. Note that tokenizer applies NFC instead of
        ftfy + html.unescape, so it matches ours only on captions that need no clean-up."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "vocab.json").write_text(json.dumps(self.encoder, ensure_ascii=False), encoding="utf-8")
        merges = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        (directory / "merges.txt").write_text(merges, encoding="utf-8")
        specials = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, "do_lower_case": True,
                  "errors": "replace", "add_prefix_space": False, **specials}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory
