"""A chat template that refuses the messages, on purpose or by the sandbox, is the user's error:
one line and exit status 2 from the CLI (the server's 400 is in test_serve.py)."""

import shutil

import pytest
from transformers import AutoTokenizer

from dovetail.cli import main
from dovetail.errors import UserError
from dovetail.models.loading import encode_chat, render_chat

RAISES = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
UNSAFE = "{{ messages.__class__.__mro__ }}"  # attribute access the Jinja sandbox refuses


@pytest.fixture
def model_with_template(tiny_model_dirs, tmp_path):
    """The tiny target, copied with ``template`` as its chat template."""
    def make(template: str):
        folder = tmp_path / "target"
        shutil.copytree(tiny_model_dirs["target"], folder, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(folder)
        return folder

    return make


@pytest.mark.parametrize("template,why", [(RAISES, "roles must alternate"), (UNSAFE, "unsafe")],
                         ids=["raises", "sandbox"])
def test_a_template_that_refuses_is_one_line_and_exit_2(model_with_template, isolated_home, capsys, template, why):
    folder = model_with_template(template)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(UserError, match="the chat template refused these messages") as refused:
        encode_chat(tokenizer, "w5 w6")
    assert why in str(refused.value) and "\n" not in str(refused.value)
    code = main(["generate", "--prompt", "w5 w6", "--chat", "--target", str(folder), "--no-draft",
                 "--engine", "inprocess", "--threads", "1", "--max-new-tokens", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: the chat template refused these messages") and why in err[-1]
    assert not [line for line in err if line.startswith("Traceback")]


def test_a_sound_template_renders_as_transformers_does(tiny_model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["target"])
    messages = [{"role": "user", "content": "w5 w6"}]
    assert render_chat(tokenizer, messages) == tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                             tokenize=False)
