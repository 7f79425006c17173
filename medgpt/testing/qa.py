"""A MedQuAD-shaped question-answer folder for the benchmark and sweep tests: one XML file per
disease (a split group), one question of each type per file, two sites."""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["DISEASES", "TYPES", "answer_text", "medquad_folder", "medquad_xml"]

TYPES = ("symptoms", "treatment", "causes", "information")
DISEASES = [f"{a} {b}" for a in ("acute", "chronic", "familial", "juvenile", "benign")
            for b in ("nephritis", "myopathy", "anemia", "dermatitis", "neuropathy",
                      "arthritis", "hepatitis", "colitis")]  # fmt: skip
WORDS = ["the", "patient", "may", "have", "fever", "pain", "swelling", "fatigue", "rash",
         "cough", "and", "weakness", "often"]  # fmt: skip


def medquad_xml(site: str, doc_id: str, pairs: list[tuple[str, str, str]]) -> str:
    """One MedQuAD file: (qtype, question, answer) pairs."""
    body = "".join(
        f'<QAPair pid="{i}"><Question qid="{doc_id}-{i}" qtype="{t}">{q}</Question>'
        f"<Answer>{a}</Answer></QAPair>\n"
        for i, (t, q, a) in enumerate(pairs, start=1)
    )
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Document id="{doc_id}" source="{site}">\n'
        f"<Focus>{doc_id}</Focus>\n<QAPairs>\n{body}</QAPairs>\n</Document>\n"
    )


def answer_text(rng: random.Random, disease: str, qtype: str) -> str:
    return f"{disease.capitalize()} {qtype}: " + " ".join(rng.choice(WORDS) for _ in range(12))


def medquad_folder(
    root: Path, diseases: list[str] = DISEASES, types: tuple[str, ...] = TYPES, seed: int = 0
) -> Path:
    """Write the folder under ``root``: file ``i`` is ``<i:07d>_1.xml`` of site GARD (even
    ``i``) or GHR, asking ``What are the {type} of {disease} ?``; the answers come from
    ``random.Random(seed)`` in file order, then type order."""
    rng = random.Random(seed)
    for i, d in enumerate(diseases):
        site = ("GARD", "GHR")[i % 2]
        folder = root / f"{i % 2 + 1}_{site}_QA"
        folder.mkdir(parents=True, exist_ok=True)
        pairs = [(t, f"What are the {t} of {d} ?", answer_text(rng, d, t)) for t in types]
        (folder / f"{i:07d}_1.xml").write_text(
            medquad_xml(site, f"{i:07d}_1", pairs), encoding="utf-8"
        )
    return root
