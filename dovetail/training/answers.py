"""A self-distilled corpus: the target's own answers to coding requests built from the stdlib.

Why: a drafter trained on module source alone is accepted far less on chat answers (prose,
markdown, docstring-led functions) than on held-out source. The target's own greedy answers are
exactly the text it produces at run time. The requests come from the Python standard library's
documented functions (name, signature, docstring), so they are offline everywhere and share
nothing with HumanEval, the evaluation set.

Answers are produced with the Dovetail engine (lossless: the target's own greedy output, at the
speculative speed, several requests batched) and appended to a JSON-lines file, one per request,
so an interrupted run resumes where it stopped and the same seed asks the same requests in the
same order.
"""

from __future__ import annotations

import ast
import json
import random
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from dovetail.training.corpus import stdlib_files

MIN_DOCSTRING_CHARS = 60


def docstring_requests(files: list[Path] | None = None, seed: int = 0) -> list[str]:
    """One request per documented public top-level function of ``files`` (default: the stdlib),
    shuffled deterministically for ``seed``."""
    requests = []
    for path in files if files is not None else stdlib_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                signature = f"{node.name}({ast.unparse(node.args)})"
                requests.append(f"Write a Python function `{signature}`.\n\n{doc}")
    random.Random(seed).shuffle(requests)
    return requests


class AnswerCorpus:
    """The answers file (JSON lines ``{"request", "answer_ids"}``) and how to grow it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by an interruption: asked again
                break
        return records

    def tokens(self) -> int:
        return sum(len(r["answer_ids"]) for r in self.records())

    def texts(self, tokenizer) -> list[str]:
        return [tokenizer.decode(r["answer_ids"], skip_special_tokens=True) for r in self.records()]

    def grow(self, generate, requests: list[str], tokens: int, max_new_tokens: int = 384,
             concurrency: int = 1) -> int:
        """Answer ``requests`` in order, skipping those already answered, until the corpus holds
        ``tokens`` answer tokens or the requests run out. ``generate(request, max_new_tokens)``
        returns the answer's token ids; ``concurrency`` calls run at once (an engine that batches
        requests), and answers are still written in request order (those still running when the
        budget is met are kept). Returns the tokens held."""
        records = self.records()
        self._rewrite_whole(records)
        held = sum(len(r["answer_ids"]) for r in records)
        todo = iter(requests[len(records):])
        bar = tqdm(total=tokens, initial=min(held, tokens), unit="tok", desc="target answers", dynamic_ncols=True)
        with ThreadPoolExecutor(concurrency) as pool, self.path.open("a", encoding="utf-8") as out:
            in_flight: deque = deque()
            while True:
                while held < tokens and len(in_flight) < concurrency and (request := next(todo, None)) is not None:
                    in_flight.append((request, pool.submit(generate, request, max_new_tokens)))
                if not in_flight:
                    break
                request, future = in_flight.popleft()
                answer = [int(t) for t in future.result()]
                out.write(json.dumps({"request": request, "answer_ids": answer}) + "\n")
                out.flush()
                held += len(answer)
                bar.update(min(len(answer), max(tokens - bar.n, 0)))
        bar.close()
        return held

    def _rewrite_whole(self, records: list[dict]) -> None:
        """Drop a torn last line left by an interruption, so appends start on a clean line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not self.path.exists() or self.path.read_text(encoding="utf-8") != text:
            self.path.write_text(text, encoding="utf-8")


def answer_corpus(target_name: str, seed: int) -> AnswerCorpus:
    """Where a target's answers for ``seed`` live (under ``$DOVETAIL_HOME/corpora``)."""
    from dovetail.store import dovetail_home

    return AnswerCorpus(dovetail_home() / "corpora" / target_name / f"answers-s{seed}.jsonl")


BATCH = 4  # requests decoding together: 4 concurrent answers make ~1.6x the tokens/s of one


def grow_answers(corpus: AnswerCorpus, target: str, tokens: int, seed: int, max_new_tokens: int = 384) -> int:
    """Grow ``corpus`` to ``tokens`` answer tokens with the Dovetail actor engine in batch mode
    (target + the packaged 0.5B draft model: the target's own greedy answers, faster than the
    target alone, ``BATCH`` requests at a time)."""
    from dovetail.api import Dovetail
    from dovetail.config import EngineConfig
    from dovetail.store import DEFAULT_DRAFT

    held = corpus.tokens()
    if held >= tokens:
        return held
    config = EngineConfig(target=target, draft=DEFAULT_DRAFT, engine="actors", max_batch=BATCH)
    with Dovetail(config, verbose=False).load() as dovetail:  # loaded here, before the worker threads
        def answer(request: str, limit: int) -> list[int]:
            prompt = dovetail.encode(request, chat=True)
            return dovetail.generate_ids(prompt, min(limit, dovetail.context_length - len(prompt))).token_ids

        return corpus.grow(answer, docstring_requests(seed=seed), tokens, max_new_tokens, concurrency=BATCH)
