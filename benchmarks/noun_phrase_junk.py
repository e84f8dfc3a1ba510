"""What the noun-phrase stage keeps from alt-text-like captions: real phrases vs junk.

``tests/stages/data/alt_text_captions.json`` holds 42 hand-written captions of the kinds web
alt-text is full of (tag lists, stock-photo boilerplate, abstract "concept" nouns, file names,
URLs, emoji, shop banners), each with the words that name something visible in the image. A kept
phrase is *real* when it contains one of its caption's visual words, else *junk*. Printed for two
filter settings side by side, on the same captions and spaCy model:

- ``before``: the block list without the alt-text additions, no letter or junk-pattern filter
  (what the stage did before these filters);
- ``after``: the defaults (``DEFAULT_BLOCKLIST``, ``min_letters`` 1, ``junk_pattern``).

    .venv/bin/python benchmarks/noun_phrase_junk.py [--show]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stages.noun_phrases import (ALT_TEXT_BLOCKLIST, DEFAULT_BLOCKLIST, NounPhraseConfig,  # noqa: E402
                                 NounPhrases)
from stages.schema import Sample  # noqa: E402

CAPTIONS = ROOT / "tests" / "stages" / "data" / "alt_text_captions.json"


def measure(stage: NounPhrases, items: list[dict]) -> dict:
    samples = [Sample(key=str(i), input_shard="alt", caption=item["caption"]) for i, item in enumerate(items)]
    stage(samples)
    real = junk = 0
    junk_texts: list[str] = []
    for sample, item in zip(samples, items):
        for phrase in sample.phrases:
            if any(word.lower() in phrase.text.lower() for word in item["visual"]):
                real += 1
            else:
                junk += 1
                junk_texts.append(phrase.text)
    visual = sum(len(item["visual"]) for item in items)
    return {"captions": len(items), "kept_samples": sum(s.kept for s in samples), "real": real, "junk": junk,
            "visual_words": visual, "junk_texts": junk_texts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--show", action="store_true", help="print the junk phrases kept")
    args = parser.parse_args()
    items = json.loads(CAPTIONS.read_text())
    before = NounPhraseConfig(blocklist=[w for w in DEFAULT_BLOCKLIST if w not in ALT_TEXT_BLOCKLIST],
                              min_letters=0, junk_pattern="")
    results = {name: measure(NounPhrases(cfg), items) for name, cfg in (("before", before),
                                                                       ("after", NounPhraseConfig()))}
    print(f"{'filters':8s} {'captions':>8s} {'kept':>5s} {'real phrases':>12s} {'junk phrases':>12s}")
    for name, r in results.items():
        print(f"{name:8s} {r['captions']:8d} {r['kept_samples']:5d} {r['real']:12d} {r['junk']:12d}")
    b, a = results["before"], results["after"]
    print(f"junk kept: {b['junk']} -> {a['junk']}; real kept: {b['real']} -> {a['real']}")
    if args.show:
        for name, r in results.items():
            print(f"{name} junk: {r['junk_texts']}")


if __name__ == "__main__":
    main()
