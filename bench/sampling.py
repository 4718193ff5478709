"""``bench --suite sampling``: what warping and drawing one row of the vocabulary costs.

One row of 151,936 logits (the packaged Qwen vocabulary), in two shapes: ``peaked`` (a few tokens
well above a Gaussian body, as a language model's next token usually is) and ``flat`` (the Gaussian
body alone, the worst case for top-p: its kept mass spreads over many tokens). For each sampling
setting: Dovetail's warp and seeded draw (``target_probs`` + ``sample_token``, what verification
does per visited row) against HF's warpers and ``torch.multinomial`` on the same row, and the
greedy argmax a sampled token is compared with. Median milliseconds over ``--reps`` rows, on 1
and 2 threads.
"""

from __future__ import annotations

import statistics
import time

from bench.common import machine_info, say, write_report

VOCAB = 151_936
SETTINGS = (dict(temperature=0.8), dict(temperature=0.8, top_p=0.9), dict(temperature=0.8, top_k=40),
            dict(temperature=0.8, top_p=0.9, top_k=40), dict(temperature=0.7, top_p=0.95),
            dict(temperature=1.5, top_p=0.95))


def logit_rows(shape: str, count: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(count, VOCAB, generator=g) * 2.0
    if shape == "peaked":
        for row in rows:
            top = torch.randint(0, VOCAB, (8,), generator=g)
            row[top] += torch.linspace(16.0, 8.0, 8)
    return rows


def _median_ms(fn, rows) -> float:
    fn(rows[0])
    times = []
    for row in rows:
        t0 = time.perf_counter()
        fn(row)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def run(args) -> int:
    import torch
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from dovetail.models.verification import sample_token, target_probs
    from dovetail.sampling import SamplingParams

    reps = max(args.reps, 5) * 4
    report = {"machine": machine_info(), "settings": {"vocab": VOCAB, "rows": reps}, "results": []}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for shape in ("peaked", "flat"):
            rows = logit_rows(shape, reps)
            greedy = _median_ms(lambda row: int(row.argmax()), rows)
            for setting in SETTINGS:
                params = SamplingParams(**setting)

                def dovetail(row, params=params):
                    return sample_token(target_probs(row[None], params)[0], 1, 0)

                def hf(row, setting=setting):
                    scores = TemperatureLogitsWarper(setting["temperature"])(None, row[None].clone())
                    if setting.get("top_k"):
                        scores = TopKLogitsWarper(setting["top_k"])(None, scores)
                    if setting.get("top_p", 1.0) < 1.0:
                        scores = TopPLogitsWarper(setting["top_p"])(None, scores)
                    return int(torch.multinomial(scores.softmax(-1), 1))

                entry = {"threads": threads, "logits": shape, **setting, "greedy_ms": greedy,
                         "dovetail_ms": _median_ms(dovetail, rows), "hf_ms": _median_ms(hf, rows)}
                report["results"].append(entry)
                say(f"{threads} thread(s), {shape}, {setting}: Dovetail {entry['dovetail_ms']} ms, "
                    f"HF {entry['hf_ms']} ms, argmax {greedy} ms")
    path = write_report(report, args)
    say(f"wrote {path}")
    return 0
