"""A self-distilled corpus: the target's own answers to coding requests built from the stdlib.

Why: a drafter trained on module source alone is accepted far less on chat answers (prose,
markdown, docstring-led functions) than on held-out source. The target's own greedy answers are
exactly the text it produces at run time. The requests come from the Python standard library's
documented functions (name, signature, docstring), so they are offline everywhere and share
nothing with HumanEval, the evaluation set.

Answers are the target's own greedy decoding, ``BATCH`` requests at a time in one padded batch
(plain batched decoding: 32-row GEMMs run near a CPU's peak, well above what speculative decoding
of a few requests reaches), appended to a
JSON-lines file, one per request, so an interrupted run resumes where it stopped and the same seed
asks the same requests in the same order. The feature dump checks every answer token against the target's own argmax.
"""

from __future__ import annotations

import ast
import json
import random
import shutil
from pathlib import Path

from tqdm import tqdm

from dovetail.models.loading import encode_chat
from dovetail.training.corpus import PACKAGED, stdlib_files

MIN_DOCSTRING_CHARS = 60
MAX_PROMPT_TOKENS = 192  # longer requests (10% of them: long docstrings) are skipped
BATCH = 32  # requests decoded together


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

    def grow(self, generate_batch, requests: list[str], tokens: int, batch: int = 1) -> int:
        """Answer ``requests`` in order, ``batch`` at a time, skipping those already answered, until
        the corpus holds ``tokens`` answer tokens or the requests run out.
        ``generate_batch(requests)`` returns one answer (token ids) per request; a batch's answers
        are written in request order. Returns the tokens held."""
        records = self.records()
        self._rewrite_whole(records)
        held = sum(len(r["answer_ids"]) for r in records)
        answered = {r["request"] for r in records}
        todo = [r for r in requests if r not in answered]
        bar = tqdm(total=tokens, initial=min(held, tokens), unit="tok", desc="target answers", dynamic_ncols=True)
        with self.path.open("a", encoding="utf-8") as out:
            for start in range(0, len(todo), batch):
                if held >= tokens:
                    break
                chunk = todo[start:start + batch]
                for request, answer in zip(chunk, generate_batch(chunk), strict=True):
                    answer = [int(t) for t in answer]
                    out.write(json.dumps({"request": request, "answer_ids": answer}) + "\n")
                    held += len(answer)
                    bar.update(min(len(answer), max(tokens - bar.n, 0)))
                out.flush()
        bar.close()
        return held

    def _rewrite_whole(self, records: list[dict]) -> None:
        """Drop a torn last line left by an interruption, so appends start on a clean line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r) + "\n" for r in records)
        if not self.path.exists() or self.path.read_text(encoding="utf-8") != text:
            self.path.write_text(text, encoding="utf-8")


def answer_corpus(target_name: str, seed: int) -> AnswerCorpus:
    """Where a target's answers for ``seed`` live (under ``$DOVETAIL_HOME/corpora``). On first use
    they start from the packaged answers for that target and seed, if Dovetail ships some (the
    feature dump checks every packaged token against the target's own argmax)."""
    from dovetail.store import dovetail_home

    path = dovetail_home() / "corpora" / target_name / f"answers-s{seed}.jsonl"
    packaged = PACKAGED / target_name / path.name
    if not path.exists() and packaged.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        shutil.copyfile(packaged, tmp)
        tmp.replace(path)
    return AnswerCorpus(path)


def batched_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos_ids: list[int], pad_id: int,
                   ) -> list[list[int]]:
    """The target's greedy continuation of each prompt, all in one left-padded batch; each answer
    ends with its first EOS id (kept) or after ``max_new_tokens``."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, eos_token_id=eos_ids, pad_token_id=pad_id)
    answers = []
    for row in out[:, width:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
        answers.append(row[:end])
    return answers


def grow_answers(corpus: AnswerCorpus, target: str, tokens: int, seed: int, max_new_tokens: int = 384,
                 batch: int = BATCH) -> int:
    """Grow ``corpus`` to ``tokens`` answer tokens with the target's batched greedy decoding.
    Answers stop at ``max_new_tokens`` (at most half the context); requests whose prompt is over
    ``MAX_PROMPT_TOKENS`` or leaves no room for the answer are skipped."""
    from dovetail.errors import UserError
    from dovetail.models.loading import load_causal_lm, load_tokenizer
    from dovetail.describe import describe_model
    from dovetail.store import resolve_model

    held = corpus.tokens()
    if held >= tokens:
        return held
    target_dir = resolve_model(target)
    tokenizer = load_tokenizer(target_dir)
    described = describe_model(target_dir, "fp32", tokenizer=tokenizer)
    model = load_causal_lm(described)
    eos = list(described.eos_token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    context = model.config.max_position_embeddings
    max_new_tokens = min(max_new_tokens, context // 2)
    longest = min(MAX_PROMPT_TOKENS, context - max_new_tokens)
    prompts = {r: encode_chat(tokenizer, r) for r in docstring_requests(seed=seed)}
    requests = [r for r, p in prompts.items() if len(p) <= longest]
    if not requests:
        raise UserError(f"no request fits {target}'s context of {context} tokens with {max_new_tokens}-token answers")
    return corpus.grow(lambda chunk: batched_greedy(model, [prompts[r] for r in chunk], max_new_tokens, eos, pad),
                       requests, tokens, batch)
