"""The self-distilled corpus (training/answers.py): requests from documented functions, answers
appended one per line and resumed after an interruption, windows cut from them for training."""

import json

from dovetail.training import corpus_windows
from dovetail.training.answers import AnswerCorpus, answer_corpus, docstring_requests
from tiny_models import tiny_tokenizer

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


def test_answers_grow_resume_after_a_torn_line_and_stop_at_the_budget(tmp_path):
    corpus = AnswerCorpus(tmp_path / "answers.jsonl")
    asked = []

    def generate(request, limit):
        asked.append(request)
        return [int(request[1:])] * 4

    requests = [f"r{i}" for i in range(10)]
    assert corpus.grow(generate, requests, tokens=8) == 8 and asked == ["r0", "r1"]
    with corpus.path.open("a") as f:
        f.write('{"request": "r2", "answer_')  # an interruption in the middle of a line
    assert corpus.tokens() == 8
    assert corpus.grow(generate, requests, tokens=20) == 20
    assert asked == ["r0", "r1", "r2", "r3", "r4"]  # r2 asked again, nothing twice
    lines = corpus.path.read_text().splitlines()
    assert [json.loads(line)["request"] for line in lines] == requests[:5]
    assert corpus.grow(generate, requests, tokens=100) == 40  # the requests ran out


def test_answer_windows_use_the_chat_framing_and_the_answers_text(isolated_home):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    corpus = answer_corpus("tiny", seed=0)
    assert isolated_home in corpus.path.parents
    corpus.grow(lambda request, limit: tokenizer.encode(" ".join(f"w{i}" for i in range(3, 40)),
                                                        add_special_tokens=False),
                ["q1", "q2", "q3"], tokens=100)
    windows = corpus_windows(tokenizer, "answers", tokens=0, answer_tokens=60, seq_len=48, seed=0,
                             target="unused", target_name="tiny")
    assert windows.token_ids and all(len(w) == 48 for w in windows.token_ids)
    body = windows.token_ids[0][windows.prefix_len:]
    assert tokenizer.decode(body).split()[:3] == ["w3", "w4", "w5"]


def test_mixed_windows_mask_the_shorter_framing(isolated_home):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}<s> {{ m['content'] }} {% endfor %}"
    answer_corpus("tiny", seed=0).grow(lambda request, limit: list(range(3, 43)), ["q1", "q2"], tokens=80)
    answers = corpus_windows(tokenizer, "answers", 0, 60, 48, 0, "unused", "tiny")
    stdlib = corpus_windows(tokenizer, "stdlib", 60, 0, 48, 0, "unused", "tiny")
    mixed = corpus_windows(tokenizer, "mixed", 60, 60, 48, 0, "unused", "tiny")
    assert answers.prefix_len < stdlib.prefix_len  # no code-block opening before whole answers
    assert mixed.token_ids == stdlib.token_ids + answers.token_ids and mixed.prefix_len == answers.prefix_len


def test_concurrent_answers_are_written_in_request_order(tmp_path):
    import threading
    import time

    corpus = AnswerCorpus(tmp_path / "answers.jsonl")
    running, most = [0], [0]
    lock = threading.Lock()

    def generate(request, limit):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05 if int(request[1:]) % 2 == 0 else 0.01)  # later requests often finish first
        with lock:
            running[0] -= 1
        return [int(request[1:])] * 3

    assert corpus.grow(generate, [f"r{i}" for i in range(12)], tokens=21, concurrency=3) >= 21
    written = [json.loads(line)["request"] for line in corpus.path.read_text().splitlines()]
    assert written == [f"r{i}" for i in range(len(written))]  # in order, none missing
    assert 7 <= len(written) <= 7 + 2  # answers already running when the budget is met are kept
    assert most[0] == 3
