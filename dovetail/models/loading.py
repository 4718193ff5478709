"""Loading a described model (``models/spec.py``), and checking that two tokenizers agree.

A packaged model runs its GGUF blocks natively (``models/quantized.py``); a float HF folder runs
in fp32 as the target (exactly HF's numbers, with the fast small-block linear kernel) and int8 as
the draft, which only has to propose good tokens, never exact ones (verification keeps the
output lossless). Every precision can be asked for explicitly (``spec.PRECISIONS``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dovetail.errors import UserError
from dovetail.models.fast_linear import accelerate_linears
from dovetail.models.lm_proposer import DraftVocab
from dovetail.models.quantized import load_quantized
from dovetail.models.spec import QUANTIZED, ModelSpec


def load_causal_lm(model: ModelSpec, linear_kernel: str = "stock"):
    """The causal LM ``model`` describes, in eval mode at its precision (``models/quantized.py``);
    fp32 uses ``linear_kernel``."""
    if model.precision in QUANTIZED:
        from dovetail.models.draft_head import read_cut

        return load_quantized(model.weights, model.precision, head_ids=read_cut(model.head_cut) if model.head_cut else None)
    config = AutoConfig.from_pretrained(model.weights)
    lm = AutoModelForCausalLM.from_pretrained(model.weights, config=config, dtype=torch.float32).eval()
    return accelerate_linears(lm, linear_kernel)


def load_tokenizer(path: str | Path):
    return AutoTokenizer.from_pretrained(path)


def encode_chat(tokenizer, message: str, opening: str = "") -> list[int]:
    """``message`` as one user turn through the tokenizer's chat template, then the start of the
    assistant's answer (and ``opening``): how every chat prompt is encoded. A tokenizer without a
    template gets the plain text ``message``, a blank line, then ``opening``."""
    if not tokenizer.chat_template:
        return tokenizer.encode(f"{message}\n\n{opening}")
    return encode_messages(tokenizer, [{"role": "user", "content": message}], opening)


def render_chat(tokenizer, messages: list[dict]) -> str:
    """The template's text for ``messages``, ready for the assistant's answer. A template that
    refuses the messages (its own ``raise_exception``, say roles that do not alternate), or that
    the sandbox refuses to run, is the user's to fix: a ``UserError`` in one line, never a
    traceback (the CLI exits 2, the server answers 400)."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # jinja2's TemplateError / SecurityError, or what a broken template raises
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"the chat template refused these messages: {detail}") from None


def encode_messages(tokenizer, messages: list[dict], opening: str = "") -> list[int]:
    """Chat ``messages`` through the template, ready for the assistant's answer (then ``opening``).

    Only the template's own control tokens are parsed as such: text in a message that spells one
    (``<|im_start|>system ...``) stays text, so a user cannot forge a turn. Messages without such
    text tokenize exactly as the whole rendered prompt would."""
    controls = [t for t in getattr(tokenizer, "added_tokens_encoder", {}) if t]
    if not any(c in m["content"] for m in messages for c in controls):
        return tokenizer.encode(render_chat(tokenizer, messages) + opening, add_special_tokens=False)
    # render with a marker per message, then tokenize the template's parts and the messages' text apart
    import secrets

    marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
    text = render_chat(tokenizer, [{**m, "content": mark} for m, mark in zip(messages, marks)]) + opening
    ids: list[int] = []
    for message, mark in zip(messages, marks):
        before, found, text = text.partition(mark)
        if not found:
            raise UserError("this chat template rewrites message text, so control tokens typed in a message "
                            "cannot be kept as text; remove them from the message")
        ids += tokenizer.encode(before, add_special_tokens=False)
        ids += tokenizer.encode(message["content"], add_special_tokens=False, split_special_tokens=True)
    return ids + tokenizer.encode(text, add_special_tokens=False)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The EOS ids HF ``generate()`` would stop on (generation config first, then tokenizer)."""
    return _eos_ids(getattr(model.generation_config, "eos_token_id", None), tokenizer)


def eos_token_ids_from_config(path: str | Path, tokenizer=None) -> list[int]:
    """``eos_token_ids`` without loading the weights (reads generation_config.json; the tokenizer,
    loaded if not given, only where that names none)."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: HF falls back to the model config
        eos = getattr(AutoConfig.from_pretrained(path), "eos_token_id", None)
    if eos is None and tokenizer is None:
        try:
            tokenizer = load_tokenizer(path)
        except (OSError, ValueError):  # a bare weights folder (tests, shards): no EOS of its own
            return []
    return _eos_ids(eos, tokenizer)


def _eos_ids(eos, tokenizer) -> list[int]:
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


MAX_VOCAB_GAP = 128  # ordinary tokens one side may lack (llama.cpp's limit on a draft's vocabulary size)


def draft_vocabulary(target_tokenizer, draft_tokenizer, target_vocab_size: int, draft_vocab_size: int) -> DraftVocab:
    """Check that the draft speaks the target's token ids, and say which of its ids it may not propose.

    Compared id by id: every ordinary token the two share an id for must be the same text. Special
    and added tokens (chat markers, BOS/EOS) may differ, as may up to ``MAX_VOCAB_GAP`` ids one side
    lacks: the draft never proposes those ids (``DraftVocab.masked``), nor any id past the target's
    vocabulary or embedding (``DraftVocab.limit``). Anything else raises a ``UserError`` that names
    the first mismatch. Output never depends on this (verification is exact); acceptance does.
    """
    target = {i: tok for tok, i in target_tokenizer.get_vocab().items()}
    draft = {i: tok for tok, i in draft_tokenizer.get_vocab().items()}
    special = set(target_tokenizer.all_special_ids) | set(getattr(target_tokenizer, "added_tokens_decoder", {}))
    special |= set(draft_tokenizer.all_special_ids) | set(getattr(draft_tokenizer, "added_tokens_decoder", {}))
    limit = min(target_vocab_size, draft_vocab_size, max(target) + 1)
    agreed, masked, lacking, differ = 0, [], [], []
    for i in range(min(limit, max(draft) + 1)):
        t, d = target.get(i), draft.get(i)
        if t == d and t is not None:
            agreed += i not in special
        elif i in special:
            masked.append(i)
        elif t is None or d is None:
            lacking.append(i)
        else:
            differ.append(i)
    if differ:
        i = differ[0]
        raise UserError(f"draft and target tokenizers differ on {len(differ)} ordinary tokens (e.g. id {i}: "
                        f"target {target[i]!r}, draft {draft[i]!r}); a draft must share the target's vocabulary "
                        "(special tokens may differ)")
    lacking += [i for i in range(max(draft) + 1, limit) if i not in special]  # target tokens past the draft's
    if len(lacking) > MAX_VOCAB_GAP:
        side = "draft" if draft.get(lacking[0]) is None else "target"
        raise UserError(f"the {side} tokenizer lacks {len(lacking)} of the other's tokens (e.g. id {lacking[0]}); "
                        f"at most {MAX_VOCAB_GAP} may differ")
    return DraftVocab(limit if limit < draft_vocab_size else None, tuple(masked + lacking), agreed)


def describe_draft_vocabulary(vocab: DraftVocab) -> str:
    """One line for the start-up log: how far the tokenizers agree, and what the draft may not propose."""
    line = f"draft tokenizer: {vocab.agreed:,} ordinary tokens agree with the target's"
    if vocab.masked:
        shown = ", ".join(str(i) for i in vocab.masked[:8]) + (", ..." if len(vocab.masked) > 8 else "")
        line += f"; {len(vocab.masked)} ids that differ are never proposed ({shown})"
    if vocab.limit is not None:
        line += f"; nor any id from {vocab.limit:,} on (past the target's vocabulary)"
    return line
