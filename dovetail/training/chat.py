"""The target's own answers to everyday chat requests: prose that the shipped code answers lack.

A draft's cut head (``models/draft_head.py``) keeps the tokens most frequent in text; counted on
code alone it misses the words of ordinary chat (a story's " shore", a letter's "Dear"), and the
draft can never propose those. This makes that text once, from the target itself, greedy:

    python -m dovetail.training.chat [--target NAME] [--tokens-per-answer 128]

and writes ``training/corpora/<target>/chat-s0.jsonl`` (``{"request", "answer_ids"}`` per line,
as the code answers), which Dovetail ships for the packaged target. Requests are made from a few
forms and many everyday subjects, so the answers cover explanations, stories, advice and letters.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dovetail.training.corpus import PACKAGED

FORMS = ["Explain {} to a curious teenager in a short paragraph.",
         "Write a short story, in one paragraph, about {}.",
         "Give me three practical tips about {}.",
         "Write a friendly letter to a neighbour about {}.",
         "Describe {} in five vivid sentences.",
         "What are the pros and cons of {}? Answer briefly."]
SUBJECTS = ["the ocean tides", "a rainy afternoon in a small town", "learning a musical instrument",
            "keeping houseplants alive", "the history of bread", "a long train journey", "saving money",
            "a lost dog finding its way home", "how vaccines work", "planning a garden", "the moon landing",
            "moving to a new city", "cooking for friends", "volcanoes", "a lighthouse keeper's night",
            "sleeping well", "electric cars", "a child's first day at school", "climbing a mountain",
            "the life of bees", "writing a novel", "autumn in the forest", "public libraries",
            "working from home", "a storm at sea", "learning a second language", "the human heart",
            "an old family recipe", "running a marathon", "birds migrating south", "a village festival",
            "recycling", "the invention of the printing press", "a friendship between two rivals",
            "staying calm before an exam", "the northern lights"]


def requests() -> list[str]:
    return [form.format(subject) for subject in SUBJECTS for form in FORMS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--tokens-per-answer", type=int, default=128)
    args = parser.parse_args(argv)
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.models.loading import encode_chat
    from dovetail.request import Request

    texts = requests()
    out = PACKAGED / args.target / "chat-s0.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with Dovetail(EngineConfig(target=args.target, draft=None, engine="inprocess")) as dt, \
            out.with_suffix(".tmp").open("w") as f:
        for start in range(0, len(texts), 12):
            chunk = texts[start:start + 12]
            results = dt.engine.generate_batch([Request(encode_chat(dt.tokenizer, text), args.tokens_per_answer,
                                                        speculate=False) for text in chunk])
            for text, result in zip(chunk, results):
                f.write(json.dumps({"request": text, "answer_ids": result.token_ids}) + "\n")
            print(f"{start + len(chunk)}/{len(texts)} answers, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out.with_suffix(".tmp").replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
