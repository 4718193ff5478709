"""``python launch.py train-draft``: corpus -> target features -> trained drafter.

    windows = corpus_windows(tokenizer, ...)         # corpus.py: stdlib code; answers.py: the target's answers
    dump    = dump_features(target, windows, ...)    # features.py: resumable memmap dump
    model   = build_drafter(target_dir, spec)        # models/drafter_net.py
    train_drafter(model, dump, settings, out)        # trainer.py: checkpointed, resumable
    model.save(out)                                  # drafter.json + drafter.safetensors

Every stage is cached under ``$DOVETAIL_HOME`` and resumes after an interruption; the same
arguments and seed give the same drafter.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dovetail.errors import UserError
from dovetail.models.drafter_net import COUNTS_FILE, DrafterSpec, build_drafter, frozen_target_tensors, top_ids
from dovetail.store import dovetail_home
from dovetail.training.answers import answer_corpus, grow_answers
from dovetail.models.loading import encode_chat
from dovetail.training.corpus import Windows, code_windows
from dovetail.training.features import FeatureDump, dump_features
from dovetail.training.trainer import CHECKPOINT, TrainSettings, train_drafter


def frequent_vocab(dump: FeatureDump, size: int, always: list[int]) -> np.ndarray:
    """The ``size`` most frequent target ids in the dump's trained positions (plus ``always``)."""
    counts = dump.token_counts().astype(np.int64)
    return top_ids(np.where(counts > 0, counts, -1), size, always)


CORPORA = ("stdlib", "answers", "mixed")
# answers are batched greedy decoding, checked against unbatched forwards: float rounding flips a
# few exact near-ties, anything more means another target (or a damaged file)
MIN_GREEDY_AGREEMENT = 0.98
DEFAULT_ANSWER_TOKENS = 60_000  # generated when a target has no answers yet


def corpus_windows(tokenizer, corpus: str, tokens: int, answer_tokens: int, seq_len: int, seed: int,
                   target: str, target_name: str) -> Windows:
    """``stdlib``: ``tokens`` tokens of module source in ``seq_len`` windows; ``answers``: about
    ``answer_tokens`` of the target's own answers (grown first if short, see answers.py; 0: all
    the corpus holds, or ``DEFAULT_ANSWER_TOKENS`` if it holds none), one window per answer after
    its own request; ``mixed``: both (padded to one length)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
    parts = []
    if corpus in ("stdlib", "mixed"):
        parts.append(code_windows(tokenizer, tokens, seq_len, seed=seed))
    if corpus in ("answers", "mixed"):
        answers = answer_corpus(target_name, seed)
        answer_tokens = answer_tokens or answers.tokens() or DEFAULT_ANSWER_TOKENS
        if answers.tokens() < answer_tokens:
            grow_answers(answers, target, answer_tokens, seed)
        parts.append(answer_windows(tokenizer, answers.records(), answer_tokens))
    width = max(len(w) for part in parts for w in part.token_ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return Windows([w + [pad] * (width - len(w)) for part in parts for w in part.token_ids],
                   min(part.prefix_len for part in parts), [span for part in parts for span in part.spans])


def answer_windows(tokenizer, records: list[dict], tokens: int) -> Windows:
    """One window per answer (in corpus order, until ``tokens`` answer tokens): its request through
    the chat template, exactly as the engine encodes it, then the answer (unpadded: lengths vary
    until ``corpus_windows`` pads them)."""
    windows, spans, held = [], [], 0
    for record in records:
        if held >= tokens:
            break
        prompt = encode_chat(tokenizer, record["request"])
        windows.append(prompt + record["answer_ids"])
        spans.append((len(prompt), len(windows[-1])))
        held += len(record["answer_ids"])
    if not windows:
        raise ValueError("the answers corpus is empty")
    return Windows(windows, min(b for b, _ in spans), spans)


def run_train_draft(target_dir: Path, target_name: str, out: Path, spec: DrafterSpec, settings: TrainSettings,
                    tokens: int, seq_len: int = 256, threads: int | None = None, say=None, corpus: str = "stdlib",
                    answer_tokens: int = 0, target: str | None = None) -> dict:
    from dovetail.models.loading import load_causal_lm, load_tokenizer
    from dovetail.describe import describe_model

    say = say or (lambda msg: print(f"[train-draft] {msg}", file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(target_dir)
    described = describe_model(target_dir, "fp32", tokenizer=tokenizer)  # features come from the fp32 target
    windows = corpus_windows(tokenizer, corpus, tokens, answer_tokens, seq_len, settings.seed,
                             target or str(target_dir), target_name)
    code_tokens = windows.trained_tokens()
    width = len(windows.token_ids[0])
    say(f"corpus {corpus!r}: {len(windows.token_ids)} windows of up to {width} tokens "
        f"({code_tokens} trained tokens after the chat framing)")
    dump_dir = dovetail_home() / "features" / target_name / f"{corpus}-{code_tokens}-{width}-s{settings.seed}"
    if not (dump_dir / "dump.json").exists() or _incomplete(dump_dir):
        target = load_causal_lm(described)
        dump = dump_features(target, windows, dump_dir, check_greedy=corpus == "answers")
        del target
    else:
        dump = FeatureDump.open(dump_dir)
    say(f"features: {dump_dir} ({dump.seconds:.0f}s of target time)"
        + (f"; {dump.greedy_agreement:.2%} of the answer tokens are the target's own argmax"
           if dump.greedy_agreement is not None else ""))
    if dump.greedy_agreement is not None and dump.greedy_agreement < MIN_GREEDY_AGREEMENT:
        raise UserError(f"the answers corpus is not {target_name}'s own greedy output: only "
                        f"{dump.greedy_agreement:.1%} of its tokens are the target's argmax; remove "
                        f"{answer_corpus(target_name, settings.seed).path} (and {dump_dir}) to regenerate it")

    embed, head = frozen_target_tensors(described.weights)
    eos = list(described.eos_token_ids)
    vocab_ids = None
    if spec.draft_vocab:
        vocab_ids = frequent_vocab(dump, spec.draft_vocab, eos)
        say(f"draft vocabulary: {len(vocab_ids)} most frequent ids of {head.shape[0]}")
    model = build_drafter(described.weights, spec, vocab_ids, seed=settings.seed, frozen=(embed, head))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"drafter: {spec.fusion} fusion, {spec.layers} layer(s), {trainable / 1e6:.1f}M trainable parameters")
    report = train_drafter(model, dump, settings, out, full_head=head if vocab_ids is not None else None)
    meta = {"target": target_name, "hidden_size": int(embed.shape[1]), "eos_token_ids": eos,
            "corpus": "python-stdlib" if corpus == "stdlib" else corpus,
            "train_tokens": report.train_tokens, "train_steps": report.steps, "train_seconds": report.seconds,
            "dump_seconds": round(dump.seconds, 1), "greedy_agreement": dump.greedy_agreement,
            "held_out_acc1": round(report.acc1, 4),
            "held_out_acc2": round(report.acc2, 4), "held_out_acc3": round(report.acc3, 4),
            "held_out_chain_tau": round(report.chain_tau, 3), "settings": asdict(settings),
            "wall_seconds": round(time.perf_counter() - t0, 1)}
    model.save(out, meta)
    np.save(Path(out) / COUNTS_FILE, dump.token_counts(head.shape[0]))  # lets the head be cut at load time
    (Path(out) / "history.json").write_text(json.dumps(report.history) + "\n")
    (Path(out) / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: its resume state is 3x the drafter
    say(f"saved {out}: held-out acceptance {report.acc1:.3f} / {report.acc2:.3f} / {report.acc3:.3f} "
        f"(chain:3 tau {report.chain_tau:.2f}); "
        f"training {report.seconds:.0f}s, features {dump.seconds:.0f}s")
    return meta


def _incomplete(dump_dir: Path) -> bool:
    meta = json.loads((dump_dir / "dump.json").read_text())
    return meta["done"] < meta["windows"]
