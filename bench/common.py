"""What the suites share: the machine they ran on, the HumanEval prompts, the argument checks of the
suites that decode them, one-token forwards timed side by side, where a report goes, and the
progress line.

It imports no suite, so every suite can import it without closing a cycle.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from dovetail.errors import UserError

DECODING_METHODS = ("target", "hf_assisted", "dovetail")


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def machine_info() -> dict:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "dtype": "float32"}


def one_token_ms(lms: dict, reps: int, rounds: int, prefix: int = 150) -> dict:
    """Median one-token forward (ms) of each CachedLM in ``lms`` after ``prefix`` tokens: ``rounds``
    rounds of ``reps`` forwards each, the models taking turns, so every median shares the host's
    noise. Each forward is dropped again (the context stays ``prefix`` tokens)."""
    import statistics
    import time

    import numpy as np
    import torch

    times = {name: [] for name in lms}
    with torch.inference_mode():
        for lm in lms.values():
            lm.reset()
            lm.extend([1000 + i for i in range(prefix)])
        for _ in range(rounds):
            for name, lm in lms.items():
                for i in range(reps):
                    t = time.perf_counter()
                    lm.forward_tree(np.array([2000 + i]), np.array([-1]), range(1), lm.committed)
                    times[name].append(time.perf_counter() - t)
                    lm.commit([])
    return {name: round(1e3 * statistics.median(v), 2) for name, v in times.items()}


def humaneval_texts(count: int) -> list[str]:
    """The first ``count`` HumanEval problems as chat messages' text."""
    from dovetail.store import humaneval_problems

    return [f"Complete the following Python function.\n\n{problem['prompt']}"
            for problem in humaneval_problems()[:count]]


def humaneval_prompts(tokenizer, count: int) -> list[list[int]]:
    from dovetail.models.loading import encode_chat

    return [encode_chat(tokenizer, text) for text in humaneval_texts(count)]


def check_decoding_args(args) -> tuple[set[str], list]:
    """``--prompts``, ``--max-new-tokens``, ``--methods`` and ``--trees``, refused before anything loads;
    returns the methods and the tree shapes."""
    from dovetail.config import parse_tree

    if args.prompts < 1 or args.max_new_tokens < 1:
        raise UserError("--prompts and --max-new-tokens must be >= 1")
    methods = set(args.methods.split(","))
    if methods - set(DECODING_METHODS):
        raise UserError(f"unknown methods {sorted(methods - set(DECODING_METHODS))}")
    return methods, [parse_tree(t) for t in args.trees.split(";") if t]


def result_path(args, suffix: str = ".json") -> Path:
    """``<--results-dir>/<--name><suffix>`` (the directory made if needed)."""
    directory = Path(args.results_dir)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{args.name}{suffix}"


def write_report(report: dict, args) -> Path:
    path = result_path(args)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path
