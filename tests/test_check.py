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
