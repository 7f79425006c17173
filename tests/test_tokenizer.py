"""The offline GPT-2 tokenizer: known ids, lossless round trips, file checks, HF parity."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medgpt.errors import TokenizerError
from medgpt.tokenizer import (
    EOT_ID,
    N_VOCAB,
    default_vocab_dir,
    get_tokenizer,
)

MEDICAL_STRINGS = [
    "Ménière's disease",
    "β-blockers 5 mg/kg",
    "HbA1c ≥ 6.5 %",
    "Patient (72 y/o ♀) presented with SpO₂ 88 % on room air; started on O₂ 2 L/min.",
    "Dx: T2DM, HTN.\n\tRx: metformin 500 mg b.i.d.\r\n",
]

MEDICAL_PARAGRAPH = (
    "A 58-year-old man with a history of type 2 diabetes mellitus (HbA1c 8.2 %) and "
    "hypertension presented to the emergency department with crushing substernal chest pain "
    "radiating to the left arm. ECG showed ST-segment elevation in leads II, III and aVF. "
    "Troponin I was 4.7 ng/mL. He received aspirin 325 mg, ticagrelor 180 mg, and heparin "
    "60 U/kg IV bolus, then underwent percutaneous coronary intervention of the right coronary "
    "artery. Post-procedure he was started on atorvastatin 80 mg, metoprolol 25 mg b.i.d., and "
    "lisinopril 5 mg daily.\n\nFollow-up: echocardiogram at 6 weeks; consider SGLT2 inhibitor "
    "(empagliflozin 10 mg) given LVEF 40 %. Allergies: penicillin → urticaria. Ménière's disease "
    "noted incidentally; β-blockers are not contraindicated."
)

# Code point ranges to draw random text from: (lo, hi) inclusive.
_RANGES = [
    (0x00, 0x1F),  # C0 controls (incl. \t \n \r)
    (0x20, 0x7E),  # printable ASCII
    (0x7F, 0x9F),  # DEL + C1 controls
    (0xA0, 0xFF),  # Latin-1 supplement
    (0x100, 0x24F),  # Latin extended
    (0x300, 0x36F),  # combining diacritical marks
    (0x370, 0x3FF),  # Greek
    (0x400, 0x4FF),  # Cyrillic
    (0x590, 0x6FF),  # Hebrew, Arabic (RTL)
    (0x900, 0x97F),  # Devanagari
    (0x2000, 0x206F),  # general punctuation, zero-width chars, unusual spaces
    (0x2190, 0x22FF),  # arrows, math operators
    (0x3000, 0x303F),  # CJK punctuation, ideographic space
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xAC00, 0xD7A3),  # Hangul syllables
    (0xE000, 0xF8FF),  # private use
    (0xFE00, 0xFE0F),  # variation selectors
    (0xFFF0, 0xFFFD),  # specials (incl. U+FFFD replacement character itself)
    (0x1F300, 0x1FAFF),  # emoji and pictographs
    (0x1F1E6, 0x1F1FF),  # regional indicators (flags)
    (0x20000, 0x2A6DF),  # CJK extension B (astral plane)
    (0xE0000, 0xE007F),  # tags
    (0x10FFF0, 0x10FFFF),  # last code points
]
_WHITESPACE = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u2028", "\u3000", "\x0b", "\x0c"]


def _random_string(rng: random.Random) -> str:
    parts: list[str] = []
    for _ in range(rng.randint(0, 40)):
        roll = rng.random()
        if roll < 0.15:
            parts.append(rng.choice(_WHITESPACE))
        elif roll < 0.25:
            # ZWJ emoji sequence / base + combining marks
            parts.append(rng.choice(["👩\u200d⚕️", "e\u0301", "a\u0308\u0323", "🏳️\u200d🌈", "👍🏽"]))
        else:
            lo, hi = rng.choice(_RANGES)
            cp = rng.randint(lo, hi)
            assert not 0xD800 <= cp <= 0xDFFF  # lone surrogates are not encodable str
            parts.append(chr(cp))
    return "".join(parts)


def _random_strings(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [_random_string(rng) for _ in range(n)]


def test_known_ids() -> None:
    enc = get_tokenizer()
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" Hello") == [18435]
    assert enc.eot_token == 50256 == EOT_ID
    assert enc.n_vocab == 50257 == N_VOCAB
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.decode([50256]) == "<|endoftext|>"
    # Not allowed by default: tiktoken refuses rather than silently splitting it.
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")
    assert enc.encode_ordinary("<|endoftext|>") != [50256]


def test_cached_per_process() -> None:
    assert get_tokenizer() is get_tokenizer("gpt2")
    assert get_tokenizer() is get_tokenizer(vocab_dir=default_vocab_dir())


@pytest.mark.parametrize("text", MEDICAL_STRINGS)
def test_round_trip_medical(text: str) -> None:
    enc = get_tokenizer()
    ids = enc.encode(text)
    assert ids and all(0 <= i < N_VOCAB for i in ids)
    assert enc.decode(ids) == text


def test_round_trip_random_unicode() -> None:
    enc = get_tokenizer()
    strings = _random_strings(600)
    # The generator really covers the ranges it claims (non-ASCII, astral, controls).
    joined = "".join(strings)
    assert any(ord(c) > 0xFFFF for c in joined)
    assert any(0x4E00 <= ord(c) <= 0x9FFF for c in joined)
    assert any(ord(c) < 0x20 for c in joined)
    assert any(0x300 <= ord(c) <= 0x36F for c in joined)
    for s in strings:
        s.encode("utf-8")  # valid str (no lone surrogates)
        ids = enc.encode(s)
        assert enc.decode(ids) == s, (s, ids)
        assert enc.decode_bytes(ids) == s.encode("utf-8")
    # A batch decodes the same as the concatenation.
    all_ids = [i for s in strings[:50] for i in enc.encode(s)]
    assert enc.decode(all_ids) == "".join(strings[:50])


def test_works_offline_in_fresh_process(tmp_path: Path) -> None:
    texts = [*MEDICAL_STRINGS, MEDICAL_PARAGRAPH, *_random_strings(20, seed=7)]
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TIKTOKEN_CACHE_DIR": str(cache),
        # Any attempt to reach the network fails fast instead of hanging.
        "HTTP_PROXY": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "",
    }
    code = (
        "import json, sys\n"
        "from medgpt.tokenizer import get_tokenizer\n"
        "texts = json.loads(sys.stdin.read())\n"
        "enc = get_tokenizer()\n"
        "print(json.dumps([enc.encode(t) for t in texts]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    enc = get_tokenizer()
    assert json.loads(proc.stdout) == [enc.encode(t) for t in texts]


def _copy_vocab(dst: Path) -> Path:
    dst.mkdir()
    src = default_vocab_dir()
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_copied_vocab_dir_gives_same_ids(tmp_path: Path) -> None:
    d = _copy_vocab(tmp_path / "vocab")
    enc = get_tokenizer(vocab_dir=d)
    assert enc.encode(MEDICAL_PARAGRAPH) == get_tokenizer().encode(MEDICAL_PARAGRAPH)


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_missing_vocab_file(tmp_path: Path, name: str) -> None:
    d = _copy_vocab(tmp_path / f"missing-{name}")
    (d / name).unlink()
    with pytest.raises(TokenizerError, match="missing") as exc:
        get_tokenizer(vocab_dir=d)
    assert str(d / name) in str(exc.value)


@pytest.mark.parametrize("name", ["vocab.bpe", "encoder.json"])
def test_altered_vocab_file(tmp_path: Path, name: str) -> None:
    d = _copy_vocab(tmp_path / f"altered-{name}")
    p = d / name
    data = bytearray(p.read_bytes())
    i = len(data) // 2
    data[i] = (data[i] + 1) % 256  # one byte changed, same length
    p.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="altered") as exc:
        get_tokenizer(vocab_dir=d)
    assert str(p) in str(exc.value)


def test_unknown_tokenizer_name() -> None:
    with pytest.raises(TokenizerError) as exc:
        get_tokenizer("cl100k_base")
    msg = str(exc.value)
    assert "cl100k_base" in msg
    assert "allowed: gpt2" in msg


def test_matches_transformers_gpt2_tokenizer(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    src = default_vocab_dir()
    shutil.copyfile(src / "encoder.json", tmp_path / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", tmp_path / "merges.txt")
    # from_pretrained on the folder reads vocab.json + merges.txt in transformers 4 and 5 alike;
    # in transformers 5 the constructor's ``vocab_file=``/``merges_file=`` keywords are
    # silently ignored and give an empty tokenizer.
    hf = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    assert len(hf) == N_VOCAB
    enc = get_tokenizer()
    ours = enc.encode(MEDICAL_PARAGRAPH)
    assert len(ours) > 100
    assert hf.encode(MEDICAL_PARAGRAPH) == ours
    for s in [*MEDICAL_STRINGS, "Hello world", *_random_strings(30, seed=99)]:
        assert hf.encode(s) == enc.encode(s), s


def test_unusable_tiktoken_cache_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {
        **os.environ,
        "TIKTOKEN_CACHE_DIR": str(blocker / "cache"),  # under a file: cannot be created
    }
    code = (
        "from medgpt.errors import TokenizerError\n"
        "from medgpt.tokenizer import get_tokenizer\n"
        "try:\n"
        "    print(get_tokenizer().encode('Hello world'))\n"
        "except TokenizerError as e:\n"
        "    print('TokenizerError', e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    # The tokenizer never touches tiktoken's file cache, so an unusable one changes nothing.
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[15496, 995]", proc.stdout
