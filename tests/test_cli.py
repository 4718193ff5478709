"""The CLI contract (DESIGN.md section 4): JSON output, and status 2 with one line on bad input."""

import json

import pytest

from dovetail.cli import main


@pytest.fixture
def run(tiny_model_dirs, isolated_home, capsys):
    def _run(*args, models=True):
        argv = ["generate", *args]
        if models:
            argv += ["--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"]),
                     "--threads", "1"] + ([] if "--engine" in args else ["--engine", "inprocess"])
        code = main(argv)
        out, err = capsys.readouterr()
        return code, out, err

    return _run


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["--prompt", ""], "prompt is empty"),
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "w5", "--max-new-tokens", "0"], "max-new-tokens must be >= 1"),
    (["--prompt", "w5", "--temperature", "-0.5"], "temperature must be >= 0"),
    (["--prompt", "w5", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "w5", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "w5", "--top-k", "-2"], "top_k must be >= 0"),
    (["--prompt", "w5", "--tree", "16,7"], "bad tree"),
    (["--prompt", " ".join(["w7"] * 70)], "the target's context is 64"),
    (["--prompt", "w5", "--sockets", "0|0"], "share CPUs"),
    (["--prompt", "w5", "--sockets", "0-x"], "bad CPU list"),
    (["--prompt", "w5", "--engine", "actors", "--sockets", "0", "--shards", "2"], "2 target shards but only 1 CPU"),
])
def test_bad_input_exits_2_with_one_line(run, args, message):
    code, out, err = run(*args)
    assert code == 2 and out == ""
    assert message in _one_line_error(err)


def test_unknown_model_name_and_missing_directory(run, tmp_path):
    code, _, err = run("--prompt", "w5", "--target", "no-such-model", models=False)
    assert code == 2 and "unknown model 'no-such-model'" in _one_line_error(err)
    code, _, err = run("--prompt", "w5", "--target", str(tmp_path / "missing"), models=False)
    assert code == 2 and "a GGUF file or an existing directory" in _one_line_error(err)


def test_json_output_contract(run):
    code, out, err = run("--prompt", "w5 w9 w11", "--max-new-tokens", "12", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert set(result) == {"text", "token_ids", "prompt_token_ids", "stats"}
    assert result["prompt_token_ids"] == [5, 9, 11]
    assert 1 <= len(result["token_ids"]) <= 12
    stats = result["stats"]
    for key in ("new_tokens", "steps", "mean_accepted", "tokens_per_s", "draft_s", "verify_s",
                "acceptance_by_position"):
        assert key in stats
    assert stats["new_tokens"] == len(result["token_ids"])


def test_chat_and_seeded_sampling(run):
    args = ("--prompt", "w5 w6", "--chat", "--json", "--temperature", "0.8", "--top-k", "20", "--seed", "3")
    first, second = run(*args), run(*args)
    assert first[0] == 0 and second[0] == 0
    result, again = json.loads(first[1]), json.loads(second[1])
    assert result["token_ids"] == again["token_ids"] and result["text"] == again["text"]
    assert result["prompt_token_ids"][:1] == [2]  # "<s>" from the chat template is <unk> in this vocab


def test_real_process_exit_status_and_single_error_line(isolated_home, launch):
    proc = launch("generate", "--prompt", "x", "--top-p", "2", timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: top_p must be in (0, 1], got 2.0"]
    proc = launch("generate", timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_actor_engine_end_to_end_matches_in_process(tiny_model_dirs, isolated_home, launch):
    """The default engine (Ray actors, two virtual sockets) through a real launch.py process."""
    base = ["generate", "--prompt", "w5 w9 w11", "--max-new-tokens", "16", "--json",
            "--target", tiny_model_dirs["target"], "--draft", tiny_model_dirs["draft"]]
    actors = launch(*base, "--sockets", "0|1")
    inproc = launch(*base, "--engine", "inprocess")
    assert actors.returncode == 0, actors.stderr[-2000:]
    assert "placement plan" in actors.stderr and "target shard 1/2" in actors.stderr
    assert json.loads(actors.stdout)["token_ids"] == json.loads(inproc.stdout)["token_ids"]


def test_no_command_serves_the_defaults_on_loopback(monkeypatch):
    import dovetail.serve.server as server
    from dovetail.store import DEFAULT_TARGET

    seen = {}
    monkeypatch.setattr(server, "run_server", lambda config: seen.setdefault("config", config) and 0)
    assert main([]) == 0
    config = seen["config"]
    assert (config.host, config.port, config.engine.target, config.engine.max_batch) == ("127.0.0.1", 8000, DEFAULT_TARGET, "auto")


@pytest.mark.parametrize("args,message", [
    (["--port", "0"], "port"),
    (["--replicas", "2", "--sockets", "0"], "cannot split the machine into 2 replicas"),
    (["--engine", "inprocess"], "serve runs the actor engine"),
    (["--max-replicas", "1", "--replicas", "2"], "max_replicas must be >= min_replicas"),
])
def test_serve_refuses_bad_settings_in_one_line(tiny_model_dirs, isolated_home, capsys, args, message):
    code = main(["serve", "--target", str(tiny_model_dirs["target"]), "--no-draft", *args])
    assert code == 2
    assert message in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("args,message", [
    (["--answer-tokens", "-1"], "--answer-tokens must be >= 0"),
    (["--lr", "2"], "--lr must be in (0, 1)"),
])
def test_train_draft_bad_input_is_one_line(isolated_home, tiny_model_dirs, capsys, args, message):
    code = main(["train-draft", "--target", str(tiny_model_dirs["target"]), *args])
    assert code == 2 and message in _one_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["generate", "serve", "check"])
def test_the_cli_exposes_every_engine_config_field(command):
    """The engine's flags are made from EngineConfig: every field has one, with its choices, and the
    parsed flags give back the same config (serve's batch default is its own)."""
    from dataclasses import fields

    from dovetail.cli import build_parser
    from dovetail.config import EngineConfig, engine_config_from_args

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    dests = {action.dest: action for action in sub._actions}
    for f in fields(EngineConfig):
        assert f.name in dests, f"--{f.name.replace('_', '-')} is missing from {command}"
    assert tuple(dests["target_precision"].choices) == tuple(EngineConfig.__dataclass_fields__["target_precision"]
                                                           .metadata["cli"]["choices"])
    base = ["--prompt", "x"] if command == "generate" else []
    args = parser.parse_args([command, *base, "--no-draft", "--tree", "8,4,2", "--shards", "2", "--no-pipeline",
                              "--kv-memory-mb", "64", "--target-precision", "int8"])
    config = engine_config_from_args(args)
    assert (config.draft, str(config.tree), config.shards, config.pipeline, config.kv_memory_mb,
            config.target_precision) == (None, "8,4,2", 2, False, 64, "int8")
    assert config.max_batch == ("auto" if command == "serve" else 1)  # one prompt at a time: nothing to batch
    assert parser.parse_args([command, *base, "--max-batch", "3"]).max_batch == 3
    with pytest.raises(SystemExit):
        parser.parse_args([command, *base, "--max-batch", "many"])
    assert config.threads == EngineConfig().threads and config.target == EngineConfig().target


def test_serve_config_embeds_the_engine_config_flat_or_nested():
    from dovetail.config import EngineConfig
    from dovetail.errors import UserError
    from dovetail.serve import ServeConfig

    flat = ServeConfig.parse({"target": "t", "tree": "chain:5", "max_batch": 2, "port": 9000})
    nested = ServeConfig.parse({"engine": EngineConfig(target="t", tree="chain:5", max_batch=2), "port": 9000})
    assert flat.engine == nested.engine and flat.engine.engine == "actors" and flat.port == 9000
    assert ServeConfig.parse(flat.to_args()).engine == flat.engine  # what a replica receives reads back the same
    assert ServeConfig.parse({}).engine.max_batch == "auto" and ServeConfig.parse({"max_batch": "6"}).engine.max_batch == 6
    with pytest.raises(UserError, match="max_batch must be >= 1"):
        ServeConfig.parse({"max_batch": 0})
    with pytest.raises(UserError, match="serve runs the actor engine"):
        ServeConfig.parse({"engine": "inprocess"})
    with pytest.raises(UserError, match="bogus"):
        ServeConfig.parse({"bogus": 1})
