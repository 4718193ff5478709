"""The DGF feature drafter: shapes, gating, training (loss, checkpoint/resume, determinism), and
that speculative decoding with it stays exactly the target's (greedy) and lossless (sampling)."""

import numpy as np
import pytest
import torch

from dovetail.engine import SpeculativeEngine
from dovetail.errors import UserError
from dovetail.models.cached_lm import CachedLM
from dovetail.models.drafter_net import DrafterSpec, FeatureDrafter, build_drafter, load_drafter
from dovetail.models.feature_proposer import FeatureDraftProposer
from dovetail.models.target import TargetVerifier
from dovetail.models.tree import TreeShape
from dovetail.sampling import SamplingParams
from dovetail.training.pipeline import frequent_vocab
from dovetail.training import trainer as trainer_module
from dovetail.training.corpus import Windows
from dovetail.training.features import dump_features
from dovetail.training.trainer import TrainSettings, held_out_acceptance, split_windows, train_drafter
from test_sampling import chi_square_pvalue, exact_joint
from tiny_models import VOCAB, hf_greedy, tiny_model

EOS = 1


def drafter_for(target, spec=DrafterSpec(), vocab_ids=None, seed=0):
    torch.manual_seed(seed)
    head = target.lm_head.weight.detach().clone()
    return FeatureDrafter(target.config, spec, target.model.embed_tokens.weight.detach().clone(), head, vocab_ids)


def feature_engine(target, drafter, shape, **loop_options):
    return SpeculativeEngine(TargetVerifier(CachedLM(target, keep_hidden=True)),
                             FeatureDraftProposer(CachedLM(drafter), shape), [EOS], **loop_options)


def greedy_windows(target, n, seq, seed):
    """Windows of the target's own greedy continuations of random prompts: the text a drafter
    meets at decoding time (random tokens alone would teach it nothing about the target)."""
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(n):
        prompt = torch.randint(3, VOCAB, (4,), generator=gen).tolist()
        windows.append(prompt + hf_greedy(target, prompt, seq - 4))
    return Windows(windows, prefix_len=4)


@pytest.fixture(scope="module")
def target():
    """A target whose attention output is zeroed: its next token depends on the current one only,
    so a drafter learns it from ~1k tokens in seconds (a random full target would need far more)."""
    model = tiny_model("llama", seed=3, num_hidden_layers=2, initializer_range=0.6)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    return model


@pytest.fixture(scope="module")
def feature_dump(target, tmp_path_factory):
    return dump_features(target, greedy_windows(target, 48, 32, seed=0), tmp_path_factory.mktemp("dump"), batch=8)


SETTINGS = TrainSettings(steps=150, batch=8, lr=3e-3, warmup=10, eval_every=50, checkpoint_every=25, seed=0)


@pytest.fixture(scope="module")
def trained_drafter(target, feature_dump, tmp_path_factory):
    model = drafter_for(target)
    report = train_drafter(model, feature_dump, SETTINGS, tmp_path_factory.mktemp("train"))
    return model, report


def test_dgf_shapes_and_gate(target):
    model = drafter_for(target)
    feats, ids = torch.randn(2, 5, 64), torch.randint(0, VOCAB, (2, 5))
    out = model(ids, feats)
    assert out.logits.shape == (2, 5, VOCAB) and out.hidden.shape == (2, 5, 64)
    with torch.no_grad():
        h1 = model.w1(feats)
        h2 = torch.nn.functional.silu(model.w2(model.embed_norm(model.embed_weight[ids])))
        model.wz.weight.zero_()
        model.wz.bias.fill_(30.0)  # gate fully open: the feature path alone
        torch.testing.assert_close(model.fuse(feats, ids), h1)
        model.wz.bias.fill_(-30.0)  # gate closed: the token path alone
        torch.testing.assert_close(model.fuse(feats, ids), h2)
        model.wz.bias.zero_()  # z = 1/2: the mean
        torch.testing.assert_close(model.fuse(feats, ids), (h1 + h2) / 2)
    fc = drafter_for(target, DrafterSpec(fusion="fc", layers=2))
    assert fc(ids, feats).hidden.shape == (2, 5, 64) and len(fc.body.layers) == 2
    assert isinstance(fc.body.layers[0].input_layernorm, torch.nn.Identity)
    assert not isinstance(fc.body.layers[1].input_layernorm, torch.nn.Identity)  # later layers keep theirs


def test_bad_spec_is_refused():
    for bad in (dict(layers=0), dict(fusion="concat"), dict(draft_vocab=-1), dict(init="zeros")):
        with pytest.raises(UserError):
            DrafterSpec(**bad)


def test_init_from_the_targets_last_layers(target, tmp_path):
    """``init="target"``: the drafter's layers start as the target's last ones (the first without
    its input norm); the default init does not copy them."""
    target.save_pretrained(tmp_path)
    copied = build_drafter(tmp_path, DrafterSpec(layers=2, init="target"))
    for j, source in enumerate(target.model.layers):  # the tiny target has 2 layers: all copied
        mine, theirs = copied.body.layers[j].state_dict(), source.state_dict()
        expected = {k for k in theirs if not (j == 0 and k.startswith("input_layernorm"))}
        assert set(mine) == expected
        for key in expected:
            torch.testing.assert_close(mine[key], theirs[key], msg=key)
    last = build_drafter(tmp_path, DrafterSpec(layers=1, init="target")).body.layers[0]
    torch.testing.assert_close(last.mlp.down_proj.weight, target.model.layers[1].mlp.down_proj.weight)
    fresh = build_drafter(tmp_path, DrafterSpec(layers=1)).body.layers[0]
    assert not torch.equal(fresh.mlp.down_proj.weight, target.model.layers[1].mlp.down_proj.weight)


def test_reduced_vocabulary_maps_back_to_target_ids(target):
    ids = torch.tensor([1, 5, 9, 40])
    model = drafter_for(target, DrafterSpec(draft_vocab=4), vocab_ids=ids)
    out = model(torch.tensor([[3, 4]]), torch.randn(1, 2, 64))
    finite = torch.isfinite(out.logits[0, 0]).nonzero().flatten()
    assert finite.tolist() == ids.tolist()
    assert model.head_weight.shape == (4, 64)


def test_training_lowers_the_loss_and_raises_acceptance(target, feature_dump, trained_drafter):
    model, report = trained_drafter
    losses = [h["loss"] for h in report.history]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    _, held_out = split_windows(len(feature_dump.tokens), SETTINGS.held_out, SETTINGS.seed)
    untrained = held_out_acceptance(drafter_for(target).eval(), feature_dump, held_out)
    assert report.acc1 > untrained[0] + 0.3 and report.acc2 > untrained[1] + 0.3, (report, untrained)


def test_checkpoint_resume_is_exact(target, feature_dump, tmp_path, monkeypatch):
    settings = TrainSettings(steps=12, batch=4, lr=1e-3, warmup=2, eval_every=6, checkpoint_every=5, seed=7)
    straight = drafter_for(target, seed=1)
    train_drafter(straight, feature_dump, settings, tmp_path / "straight")

    save = trainer_module._save_checkpoint

    def save_then_die(path, model, opt, sched, order_rng, noise_gen, step, *rest):
        save(path, model, opt, sched, order_rng, noise_gen, step, *rest)
        if step == 10:
            raise KeyboardInterrupt  # the run is interrupted right after its step-10 checkpoint

    monkeypatch.setattr(trainer_module, "_save_checkpoint", save_then_die)
    interrupted = drafter_for(target, seed=1)
    with pytest.raises(KeyboardInterrupt):
        train_drafter(interrupted, feature_dump, settings, tmp_path / "resumed")
    monkeypatch.setattr(trainer_module, "_save_checkpoint", save)
    resumed = drafter_for(target, seed=99)  # different init: everything must come from the checkpoint
    report = train_drafter(resumed, feature_dump, settings, tmp_path / "resumed")
    assert report.steps == 12
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_same_seed_same_drafter(target, feature_dump, tmp_path):
    settings = TrainSettings(steps=6, batch=4, lr=1e-3, warmup=2, eval_every=6, checkpoint_every=6, seed=3)
    a, b = drafter_for(target, seed=5), drafter_for(target, seed=5)
    train_drafter(a, feature_dump, settings, tmp_path / "a")
    train_drafter(b, feature_dump, settings, tmp_path / "b")
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_padding_past_a_windows_span_changes_nothing(target, tmp_path):
    """Windows of different lengths padded to one: what lies past a window's span (its padding)
    never reaches the loss or the held-out acceptance, whatever it holds."""
    greedy = greedy_windows(target, 12, 24, seed=4)
    ends = [12 + (i % 3) * 6 for i in range(12)]  # trained tokens 4..end-1: lengths 12, 18, 24

    def padded_dump(pad_seed, name):
        gen = torch.Generator().manual_seed(pad_seed)
        windows = [w[:end] + torch.randint(3, VOCAB, (24 - end,), generator=gen).tolist()
                   for w, end in zip(greedy.token_ids, ends)]
        return dump_features(target, Windows(windows, 4, [(4, end) for end in ends]), tmp_path / name, batch=4)

    settings = TrainSettings(steps=4, batch=4, lr=1e-3, warmup=1, eval_every=4, checkpoint_every=4, seed=2,
                             held_out=0.25)
    (a_dump, b_dump) = padded_dump(1, "a"), padded_dump(2, "b")
    assert not np.array_equal(a_dump.tokens, b_dump.tokens)
    a, b = drafter_for(target, seed=5), drafter_for(target, seed=5)
    report_a = train_drafter(a, a_dump, settings, tmp_path / "train-a")
    report_b = train_drafter(b, b_dump, settings, tmp_path / "train-b")
    for name, value in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[name], value, msg=name)
    train_ids, _ = split_windows(12, settings.held_out, settings.seed)
    assert report_a.train_tokens == report_b.train_tokens == sum(ends[i] - 4 for i in train_ids)
    assert (report_a.acc1, report_a.acc2, report_a.acc3) == pytest.approx((report_b.acc1, report_b.acc2, report_b.acc3))


def test_save_and_load_round_trip(target, trained_drafter, tmp_path):
    model, _ = trained_drafter
    model.save(tmp_path, {"hidden_size": 64})
    target.save_pretrained(tmp_path / "target")
    loaded = load_drafter(tmp_path, tmp_path / "target")
    feats, ids = torch.randn(1, 6, 64), torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, feats).logits, model(ids, feats).logits)


@pytest.mark.parametrize("shape", ["chain:1", "chain:4", "8,4,2", "16,7,10"])
def test_greedy_identical_to_target_with_the_feature_drafter(target, trained_drafter, shape):
    model, _ = trained_drafter
    engine = feature_engine(target, model, TreeShape.parse(shape))
    accepted = 0
    for length, seed in ((1, 0), (5, 1), (11, 2)):
        prompt = torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
        result = engine.generate(prompt, 30)
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=EOS)
        accepted += sum(result.stats.accepted_per_step)
    assert accepted > 10, "the trained drafter was (almost) never accepted: the test would not exercise acceptance"


@pytest.mark.parametrize("betting,max_batch", [(False, 3), (True, 1), (True, 3)],
                         ids=["batch", "betting", "batch+betting"])
def test_feature_drafter_batched_and_betting_in_process(target, trained_drafter, betting, max_batch):
    """The feature drafter in a batch of requests (each tree grown from its own request's
    features) and betting (the next tree grown from predicted features) stays the target's
    greedy output; one request of the batch runs without speculation; bets held and missed."""
    from dovetail.request import Request

    model, _ = trained_drafter
    engine = feature_engine(target, model, TreeShape.parse("8,4,2"), betting=betting, max_batch=max_batch)
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (1, 5, 11, 3)]
    requests = [Request(p, 30, speculate=i != 2) for i, p in enumerate(prompts)]
    results = engine.generate_batch(requests)
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=EOS)
    assert results[2].stats.mean_accepted == 1.0 and results[2].stats.bets == 0
    drafted = [r.stats for i, r in enumerate(results) if i != 2]
    assert sum(sum(s.accepted_per_step) for s in drafted) > 10
    if betting:
        assert all(s.pipelined and s.bets == s.steps for s in drafted)
        held = sum(s.bets_held for s in drafted)
        assert 0 < held < sum(s.bets for s in drafted), "bets should both hold and miss"
    assert engine.loop.live == [] and engine.loop.speculator.states == {} and engine.loop.verifier.states == {}


def test_sampling_with_a_betting_feature_drafter_is_lossless():
    from test_sampling import PROMPT, VOCAB as SMALL_VOCAB

    target = tiny_model("llama", seed=11, vocab_size=SMALL_VOCAB, initializer_range=0.5, num_hidden_layers=1)
    drafter = drafter_for(target, seed=2).eval()
    with torch.no_grad():
        drafter.body.layers[0].load_state_dict(target.model.layers[0].state_dict(), strict=False)
    engine = feature_engine(target, drafter, TreeShape.parse("6,2,3"), betting=True)
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=6)
    exact = exact_joint(target, params)
    n, counts, held = 1200, {}, 0
    for seed in range(n):
        result = engine.generate(PROMPT, 3, SamplingParams(0.9, 0.95, 6, seed=seed))
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        held += result.stats.bets_held
    assert held > n // 100, "no bet held: the test would not exercise a held bet"
    assert chi_square_pvalue(counts, exact, n) > 1e-3


def test_reduced_vocabulary_drafter_stays_exact(target, feature_dump, trained_drafter):
    ids = torch.as_tensor(frequent_vocab(feature_dump, 40, [EOS]))
    assert EOS in ids.tolist() and len(ids) == 40
    model, _ = trained_drafter
    reduced = drafter_for(target, DrafterSpec(draft_vocab=40), vocab_ids=ids)
    reduced.load_state_dict(model.state_dict())
    engine = feature_engine(target, reduced.eval(), TreeShape.parse("6,3,2"))
    prompt = [5, 9, 17]
    assert engine.generate(prompt, 30).token_ids == hf_greedy(target, prompt, 30, eos=EOS)


def test_sampling_with_the_feature_drafter_is_lossless():
    from test_sampling import PROMPT, VOCAB as SMALL_VOCAB

    target = tiny_model("llama", seed=11, vocab_size=SMALL_VOCAB, initializer_range=0.5, num_hidden_layers=1)
    drafter = drafter_for(target, seed=2).eval()
    with torch.no_grad():  # a drafter that roughly follows the target: copy its only layer
        drafter.body.layers[0].load_state_dict(target.model.layers[0].state_dict(), strict=False)
    engine = feature_engine(target, drafter, TreeShape.parse("6,2,3"))
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=6)
    exact = exact_joint(target, params)
    n = 1500
    counts, accepted = {}, 0
    for seed in range(n):
        result = engine.generate(PROMPT, 3, SamplingParams(0.9, 0.95, 6, seed=seed))
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
        accepted += sum(result.stats.accepted_per_step)
    assert accepted > n * 0.2, "drafts were rarely accepted: the test would not exercise acceptance"
    assert chi_square_pvalue(counts, exact, n) > 1e-3


def test_int8_and_cut_head_at_load_time_stay_exact(target, feature_dump, trained_drafter, tmp_path):
    """A drafter trained on the full vocabulary, loaded with its head cut to the corpus's most
    frequent tokens and int8 linears: faster drafts, same exact output."""

    model, _ = trained_drafter
    model.save(tmp_path, {"hidden_size": 64, "eos_token_ids": [EOS]})
    np.save(tmp_path / "token_counts.npy", feature_dump.token_counts(VOCAB))
    target.save_pretrained(tmp_path / "target")
    cut = load_drafter(tmp_path, tmp_path / "target", draft_vocab=30, precision="int8")
    assert cut.head_weight.shape[0] == 30 and EOS in cut.vocab_ids.tolist() and cut.int8_head is not None
    counts = feature_dump.token_counts(VOCAB)
    kept = set(cut.vocab_ids.tolist()) - {EOS}
    assert min(counts[list(kept)]) >= max(np.delete(counts, list(kept | {EOS})))  # the most frequent ones
    engine = feature_engine(target, cut, TreeShape.parse("chain:4"))
    accepted = 0
    for prompt in ([5, 9, 17], [40], [3, 3, 60, 12, 8]):
        result = engine.generate(prompt, 30)
        assert result.token_ids == hf_greedy(target, prompt, 30, eos=EOS)
        accepted += sum(result.stats.accepted_per_step)
    assert accepted > 5
