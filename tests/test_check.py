"""``launch.py check``: passes on a sound pair, fails on a kernel broken on purpose."""

import pytest

from dovetail.check import chi_square_pvalue
from dovetail.cli import main
from dovetail.kernels import ops


def _check(tiny_model_dirs, capsys):
    code = main(["check", "--target", str(tiny_model_dirs["target"]), "--draft", str(tiny_model_dirs["draft"]),
                 "--threads", "1", "--samples", "80", "--new-tokens", "12"])
    return code, capsys.readouterr().out


def test_check_passes_on_a_sound_pair_and_recommends_settings(tiny_model_dirs, isolated_home, capsys):
    code, out = _check(tiny_model_dirs, capsys)
    assert code == 0, out
    for name in ("kernels", "greedy identity", "sampling"):
        assert f"PASS  {name}:" in out, out
    assert "cost curve: verify" in out and "speed: speculative" in out
    assert "all checks passed" in out and "recommended here: --engine inprocess" in out


def test_check_fails_on_a_kernel_path_broken_on_purpose(tiny_model_dirs, isolated_home, capsys, monkeypatch):
    module, real = ops(), ops().qmatmul
    best = module.best_isa()

    def broken(x, *args):
        out = real(x, *args)
        return out + 1e-3 if args[-1] == best else out  # the best path, off by a little

    monkeypatch.setattr(module, "qmatmul", broken)
    code, out = _check(tiny_model_dirs, capsys)
    assert code == 1
    assert "FAIL  kernels:" in out and "FAILED: kernels" in out


def test_the_chi_square_test_tells_a_fair_sampler_from_a_skewed_one():
    probs = {"a": 0.5, "b": 0.3, "c": 0.2}
    assert chi_square_pvalue({"a": 50, "b": 30, "c": 20}, probs, 100) > 0.9
    assert chi_square_pvalue({"a": 80, "b": 15, "c": 5}, probs, 100) < 1e-6
    assert chi_square_pvalue({"a": 50, "b": 30, "d": 20}, probs, 100) == 0.0  # a draw that cannot happen
    from scipy import stats

    counts = {"a": 44, "b": 36, "c": 20}
    assert chi_square_pvalue(counts, probs, 100) == pytest.approx(
        stats.chisquare([44, 36, 20], [50, 30, 20]).pvalue, rel=1e-9)


def test_check_races_the_ways_to_run_a_gguf_draft(tmp_path, isolated_home, capsys):
    """A GGUF draft is timed and raced as ``q4`` and ``native``, its head cut and whole, and the
    recommendation names a variant only when one paid."""
    from test_quantized import gguf_model

    _, target, _ = gguf_model(tmp_path / "target", "llama", seed=1)  # (its tiny tokenizer loads as itself)
    _, draft, _ = gguf_model(tmp_path / "draft", "llama", seed=1, num_hidden_layers=1)
    code = main(["check", "--target", str(target), "--draft", str(draft), "--threads", "1", "--samples", "40",
                 "--new-tokens", "8"])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out + captured.err[-2000:]
    line = next(line for line in out.splitlines() if "draft variants:" in line)
    for flags in ("--draft-precision q4: a level", "--draft-precision native: a level",
                  "--draft-precision native --draft-vocab 0: a level"):
        assert flags in line, line
    assert line.count("x the target alone") == 3
    recommended = next(line for line in out.splitlines() if line.startswith("recommended here:"))
    paid = [float(x.split("x the target alone")[0].rsplit(" ", 1)[-1]) for x in line.split("; --draft")]
    assert ("(the cheapest draft variant that paid here)" in recommended) == (max(paid) >= 1.05), (line, recommended)
