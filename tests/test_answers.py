"""The self-distilled corpus (training/answers.py): requests from documented functions, answers
decoded in batches (each equal to its own greedy decoding), appended one per line and resumed
after an interruption, one training window per answer, and the dump's greedy check."""

import json

import numpy as np
import torch

from dovetail.training.pipeline import corpus_windows
from dovetail.training.answers import (AnswerCorpus, answer_corpus, batched_greedy, docstring_requests,
                                      grow_answers)
from dovetail.models.loading import encode_chat
from dovetail.training.corpus import Windows
from dovetail.training.features import dump_features
from tiny_models import described, hf_greedy, tiny_model, tiny_tokenizer

MODULE = '''
def public(a, b=2, *, c=None):
    """Add a and b, then scale the sum by c when it is given; the docstring is long enough."""

def _private(x):
    """A private helper, which is never turned into a request however long this docstring is."""

def short(x):
    """Too short."""

class Widget:
    def method(self):
        """Methods are not top-level functions, so they are skipped as well, whatever they say."""
'''


def test_requests_come_from_documented_public_functions(tmp_path):
    (tmp_path / "mod.py").write_text(MODULE)
    (tmp_path / "broken.py").write_text("def (:\n")  # unparsable files are skipped
    requests = docstring_requests([tmp_path / "mod.py", tmp_path / "broken.py"])
    assert requests == ["Write a Python function `public(a, b=2, *, c=None)`.\n\n"
                        "Add a and b, then scale the sum by c when it is given; the docstring is long enough."]
    many = []
    for i in range(8):
        (tmp_path / f"m{i}.py").write_text(MODULE.replace("def public", f"def public{i}"))
        many.append(tmp_path / f"m{i}.py")
    assert docstring_requests(many, seed=1) == docstring_requests(many, seed=1) != docstring_requests(many, seed=2)
    assert len(docstring_requests()) > 500  # the standard library offers plenty


def answers_of(asked: list[str]):
    """A fake batched generator: request ``rN`` is answered with four tokens ``N``."""

    def generate_batch(requests):
        asked.append(list(requests))
        return [[int(r[1:])] * 4 for r in requests]

    return generate_batch


def test_answers_grow_resume_after_a_torn_line_and_stop_at_the_budget(tmp_path):
    corpus = AnswerCorpus(tmp_path / "answers.jsonl")
    asked = []
    requests = [f"r{i}" for i in range(10)]
    assert corpus.grow(answers_of(asked), requests, tokens=8) == 8 and asked == [["r0"], ["r1"]]
    with corpus.path.open("a") as f:
        f.write('{"request": "r2", "answer_')  # an interruption in the middle of a line
    assert corpus.tokens() == 8
    assert corpus.grow(answers_of(asked), requests, tokens=20) == 20
    assert asked == [["r0"], ["r1"], ["r2"], ["r3"], ["r4"]]  # r2 asked again, nothing twice
    lines = corpus.path.read_text().splitlines()
    assert [json.loads(line)["request"] for line in lines] == requests[:5]
    assert corpus.grow(answers_of(asked), requests, tokens=100) == 40  # the requests ran out


def test_answers_are_asked_in_batches_and_written_in_request_order(tmp_path):
    corpus = AnswerCorpus(tmp_path / "answers.jsonl")
    asked = []
    assert corpus.grow(answers_of(asked), [f"r{i}" for i in range(12)], tokens=21, batch=3) == 24
    assert asked == [["r0", "r1", "r2"], ["r3", "r4", "r5"]]  # a started batch is kept whole
    written = [json.loads(line)["request"] for line in corpus.path.read_text().splitlines()]
    assert written == [f"r{i}" for i in range(6)]


def test_batched_greedy_equals_each_prompts_own_greedy_decoding():
    model = tiny_model("qwen2", seed=5)
    prompts = [[5, 9, 11], [7, 3, 20, 41, 8, 2, 60], [33]]  # different lengths: left padding
    eos = 17
    answers = batched_greedy(model, prompts, max_new_tokens=12, eos_ids=[eos], pad_id=0)
    for prompt, answer in zip(prompts, answers):
        assert answer == hf_greedy(model, prompt, 12, eos=eos)
        assert eos not in answer[:-1]


def test_answer_windows_frame_each_answer_with_its_own_request(isolated_home):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    corpus = answer_corpus("tiny", seed=0)
    assert isolated_home in corpus.path.parents
    words = [tokenizer.encode(" ".join(f"w{i}" for i in range(3, n)), add_special_tokens=False) for n in (40, 20, 30)]
    corpus.grow(lambda requests: [words[int(r[1:]) - 1] for r in requests], ["q1", "q2", "q3"], tokens=100)
    windows = corpus_windows(tokenizer, "answers", tokens=0, answer_tokens=50, seq_len=48, seed=0,
                             target="unused", target_name="tiny")
    assert len(windows.token_ids) == 2  # 37 + 17 answer tokens reach the budget of 50
    width = max(len(encode_chat(tokenizer, q)) + len(w) for q, w in zip(["q1", "q2"], words))
    assert all(len(w) == width for w in windows.token_ids)
    for window, (begin, end), request, answer in zip(windows.token_ids, windows.spans, ["q1", "q2"], words):
        assert window[:begin] == encode_chat(tokenizer, request) and window[begin:end] == answer
        assert all(t == tokenizer.pad_token_id for t in window[end:])
    assert windows.trained_tokens() == len(words[0]) + len(words[1])


def test_mixed_windows_hold_both_corpora_with_their_own_spans(isolated_home):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    answer_corpus("tiny", seed=0).grow(lambda requests: [list(range(3, 43))] * len(requests), ["q1", "q2"], tokens=80)
    answers = corpus_windows(tokenizer, "answers", 0, 60, 48, 0, "unused", "tiny")
    stdlib = corpus_windows(tokenizer, "stdlib", 60, 0, 48, 0, "unused", "tiny")
    mixed = corpus_windows(tokenizer, "mixed", 60, 60, 48, 0, "unused", "tiny")
    assert answers.prefix_len < stdlib.prefix_len  # no code-block opening before whole answers
    assert mixed.spans == stdlib.spans + answers.spans
    width = len(mixed.token_ids[0])
    assert [w[:len(o)] for w, o in zip(mixed.token_ids, stdlib.token_ids + answers.token_ids)] == \
        stdlib.token_ids + answers.token_ids and all(len(w) == width for w in mixed.token_ids)


def test_the_dump_verifies_greedy_answers_and_skips_padding(tmp_path):
    model = tiny_model("qwen2", seed=5)
    prompts = [[5, 9, 11], [7, 3, 20, 41]]
    answers = batched_greedy(model, prompts, max_new_tokens=10, eos_ids=[17], pad_id=0)
    windows = [p + a for p, a in zip(prompts, answers)]
    longest = max(len(w) for w in windows)
    padded = Windows([w + [0] * (longest + 5 - len(w)) for w in windows], 3,
                     [(len(p), len(w)) for p, w in zip(prompts, windows)])
    dump = dump_features(model, padded, tmp_path / "greedy", batch=2, check_greedy=True)
    assert dump.greedy_agreement == 1.0
    assert dump.trained_tokens().tolist() == [t for a in answers for t in a]
    for row, window in enumerate(windows):  # each window's features are its own, unpadded, forward's
        alone = model.model(input_ids=torch.tensor([window])).last_hidden_state[0].to(torch.float16)
        assert torch.allclose(torch.from_numpy(np.array(dump.features[row, :len(window)])), alone, atol=2e-3)
    assert not np.asarray(dump.features[:, longest:]).any()  # padding past a batch's longest window: skipped
    wrong = Windows([w[:] for w in padded.token_ids], 3, padded.spans)
    wrong.token_ids[0][len(prompts[0])] = (answers[0][0] + 1) % 90 + 2  # not the target's choice
    assert dump_features(model, wrong, tmp_path / "wrong", batch=2, check_greedy=True).greedy_agreement < 1.0


def test_a_packaged_corpus_seeds_the_cache_once(isolated_home, tmp_path, monkeypatch):
    from dovetail.training import answers

    packaged = tmp_path / "packaged"
    (packaged / "tiny").mkdir(parents=True)
    (packaged / "tiny" / "answers-s0.jsonl").write_text(json.dumps({"request": "q", "answer_ids": [5, 6]}) + "\n")
    monkeypatch.setattr(answers, "PACKAGED", packaged)
    corpus = answer_corpus("tiny", seed=0)
    assert isolated_home in corpus.path.parents and corpus.tokens() == 2
    corpus.grow(lambda requests: [[7, 8, 9]] * len(requests), ["q", "r"], tokens=5)  # grows the copy only
    assert answer_corpus("tiny", seed=0).tokens() == 5
    assert (packaged / "tiny" / "answers-s0.jsonl").read_text().count("\n") == 1
    assert answer_corpus("tiny", seed=1).tokens() == 0  # no packaged answers for that seed


def test_grow_answers_records_the_targets_greedy_answers(isolated_home, tiny_model_dirs):
    from dovetail.models.loading import load_causal_lm, load_tokenizer

    corpus = answer_corpus("tiny", seed=0)
    assert grow_answers(corpus, str(tiny_model_dirs["target"]), tokens=30, seed=0, max_new_tokens=8, batch=3) >= 30
    records = corpus.records()
    assert len(records) % 3 == 0 and [r["request"] for r in records] == \
        [r for r in docstring_requests(seed=0) if r in {x["request"] for x in records}]  # request order
    tokenizer, model = load_tokenizer(tiny_model_dirs["target"]), load_causal_lm(described(tiny_model_dirs["target"]))
    for record in records[:4]:
        prompt = encode_chat(tokenizer, record["request"])
        assert len(prompt) + 8 <= 64  # prompts that leave no room for the answer are skipped
        assert record["answer_ids"] == hf_greedy(model, prompt, 8, eos=1)


def test_train_draft_end_to_end_on_answers(isolated_home, tiny_model_dirs, tmp_path):
    """corpus -> verified feature dump -> trained drafter, on the tiny target's own answers."""
    from dovetail.models.drafter_net import DrafterSpec, load_drafter
    from dovetail.training.pipeline import run_train_draft
    from dovetail.training.trainer import TrainSettings

    settings = TrainSettings(steps=4, batch=2, warmup=1, eval_every=2, checkpoint_every=2, held_out=0.2)
    meta = run_train_draft(tiny_model_dirs["target"], "tiny", tmp_path / "drafter", DrafterSpec(), settings,
                           tokens=0, corpus="answers", answer_tokens=60, target=str(tiny_model_dirs["target"]),
                           say=lambda msg: None)
    assert meta["corpus"] == "answers" and meta["greedy_agreement"] >= 0.98
    assert meta["train_tokens"] > 0 and meta["held_out_chain_tau"] >= 1.0
    assert (isolated_home / "corpora" / "tiny" / "answers-s0.jsonl").exists()
    drafter = load_drafter(tmp_path / "drafter", tiny_model_dirs["target"])
    assert drafter.config.hidden_size == 64
