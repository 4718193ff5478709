"""Draft/target tokenizer compatibility is checked at load."""

import pytest

from dovetail.errors import UserError
from dovetail.models.loading import draft_vocab_limit
from tiny_models import tiny_tokenizer


def test_identical_tokenizers_pass():
    assert draft_vocab_limit(tiny_tokenizer(50), tiny_tokenizer(50), 50, 50) == 50


def test_padded_larger_draft_embedding_is_masked():
    assert draft_vocab_limit(tiny_tokenizer(50), tiny_tokenizer(50), 50, 64) == 50


def test_extra_draft_tokens_past_the_target_are_masked():
    assert draft_vocab_limit(tiny_tokenizer(50), tiny_tokenizer(50, extra=("<x>", "<y>")), 64, 64) == 50


def test_different_ids_are_named():
    target = tiny_tokenizer(50)
    draft = tiny_tokenizer(50)
    vocab = draft.get_vocab()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    swapped = dict(vocab, w3=vocab["w4"], w4=vocab["w3"])
    tok = Tokenizer(models.WordLevel(swapped, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    draft = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    with pytest.raises(UserError, match=r"2 tokens have different ids \(e.g. 'w3': target id 3, draft id 4\)"):
        draft_vocab_limit(target, draft, 50, 50)


def test_missing_tokens_are_named():
    with pytest.raises(UserError, match=r"lacks 10 of the target's tokens \(e.g. 'w40'"):
        draft_vocab_limit(tiny_tokenizer(50), tiny_tokenizer(40), 50, 50)
