"""Train a feature drafter on a feature dump, with the paper's loss.

    loss = SmoothL1(predicted f_{t+1}, f_{t+1}) + 0.1 * CE(softmax(head(f_{t+1})), log_softmax(head(pred)))

The cross-entropy runs over the corpus's ``loss_vocab`` most frequent tokens (they carry nearly
all of the probability mass on code): over the full 152k-token head it would cost 5x the rest of
the step on a CPU. Inputs are the target's features with uniform noise (so the drafter tolerates its own, imperfect
predictions deeper in a tree) and the next token. AdamW with betas (0.9, 0.95), gradient clipping
0.5, linear warm-up then cosine decay. Deterministic for a seed: batch order, noise and
initialisation all come from seeded generators, and a resumed run continues exactly where the
checkpoint left off (``checkpoint.pt``: weights, optimiser, step, generator states).

Held-out acceptance: on windows kept out of training, the share of positions where the drafter's
top token equals the target's (``acc1``, teacher-forced), and the same one and two steps deeper,
fed with its own predicted features (``acc2``, ``acc3``, joint) -- what the first three levels of a
greedy draft chain see; ``chain_tau`` = 1 + acc1 + acc2 + acc3 is the chain:3 tau they predict.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dovetail.models.drafter_net import FeatureDrafter, top_ids
from dovetail.training.features import FeatureDump

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainSettings:
    steps: int = 600
    batch: int = 4
    lr: float = 3e-4
    warmup: int = 30
    noise: float = 0.2  # width of the uniform noise added to input features
    ce_weight: float = 0.1
    clip: float = 0.5
    held_out: float = 0.05  # share of windows kept out of training
    eval_windows: int = 8  # held-out windows scored at each evaluation (full-vocabulary heads are costly)
    eval_every: int = 100
    checkpoint_every: int = 50
    seed: int = 0
    max_windows: int | None = None  # train on only the first N training windows (the data curve)
    loss_vocab: int = 16384  # CE over the corpus's N most frequent tokens (0: the whole head)


@dataclass
class TrainReport:
    steps: int
    train_windows: int
    train_tokens: int
    seconds: float
    final_loss: float
    acc1: float
    acc2: float
    history: list[dict]
    acc3: float = float("nan")

    @property
    def chain_tau(self) -> float:
        return expected_chain_tau((self.acc1, self.acc2, self.acc3))


def split_windows(n: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, int(round(n * held_out))) if n > 1 else 0
    return np.sort(order[k:]), np.sort(order[:k])


def drafter_loss(model: FeatureDrafter, feats: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                 noise: float, ce_weight: float, generator: torch.Generator | None = None,
                 loss_head: torch.Tensor | None = None):
    """The paper's loss on a batch of windows; ``mask`` [B, T-1] marks the trained positions;
    ``loss_head``: the head rows the cross-entropy runs over (default: the drafter's head)."""
    inputs = feats[:, :-1]
    if noise > 0:
        inputs = inputs + (torch.rand(inputs.shape, generator=generator) - 0.5) * noise
    pred = model.predict_features(inputs, tokens[:, 1:])
    true = feats[:, 1:]
    m = mask.unsqueeze(-1).float()
    denom = m.sum().clamp(min=1)
    feature_loss = (F.smooth_l1_loss(pred, true, reduction="none") * m).sum() / (denom * pred.shape[-1])
    head = model.head_weight if loss_head is None else loss_head
    with torch.no_grad():
        target_p = torch.softmax(true @ head.T, dim=-1)
    ce = -(target_p * torch.log_softmax(pred @ head.T, dim=-1)).sum(-1)
    ce_loss = (ce * mask).sum() / denom
    return feature_loss + ce_weight * ce_loss, feature_loss.detach(), ce_loss.detach()


@torch.no_grad()
def held_out_acceptance(model: FeatureDrafter, dump: FeatureDump, windows: np.ndarray,
                        full_head: torch.Tensor | None = None, depth: int = 3) -> tuple[float, ...]:
    """Joint acceptance at chain depths 1..``depth`` on the given windows (see the module doc).
    ``full_head``: the target's LM head, when the drafter's is a reduced vocabulary (the target's
    own top token may lie outside it)."""
    hits, totals = [0] * depth, [0] * depth
    for w in windows:
        begin, end = (int(x) for x in dump.spans[w])
        start = max(begin - 1, 0)  # input positions whose next token is trained
        feats = torch.from_numpy(np.asarray(dump.features[w, :end], dtype=np.float32))[None]
        tokens = torch.from_numpy(np.asarray(dump.tokens[w, :end], dtype=np.int64))[None]
        heads = feats[0, start:] @ full_head.T if full_head is not None else model.target_logits(feats[0, start:])
        target_top = torch.cat([torch.zeros(start, dtype=torch.long), heads.argmax(-1)])  # the target's next token
        ok = None
        level_in = feats[:, :-1]
        for level in range(depth):
            # level k: the drafter's own predicted feature of the previous level (true at level 1)
            # with the next true token; right only where the levels before were right (joint)
            pred = model.predict_features(level_in, tokens[:, 1:])
            top = torch.cat([torch.zeros(start, dtype=torch.long), model.target_logits(pred[0, start:]).argmax(-1)])
            right = top[level:] == target_top[level + 1:]
            ok = right if ok is None else ok[:-1] & right
            hits[level] += int(ok[start:].sum())
            totals[level] += len(ok[start:])
            level_in = torch.cat([feats[:, :1], pred[:, :-1]], dim=1)
    return tuple(h / max(t, 1) for h, t in zip(hits, totals))


def expected_chain_tau(acceptance) -> float:
    """Tokens per step a greedy chain of ``len(acceptance)`` drafts would commit: 1 + sum of the
    joint acceptances (the bonus token plus each accepted draft)."""
    return 1.0 + float(sum(acceptance))


def train_drafter(model: FeatureDrafter, dump: FeatureDump, settings: TrainSettings, out_dir: str | Path,
                  full_head: torch.Tensor | None = None, desc: str = "train drafter") -> TrainReport:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train_ids, eval_ids = split_windows(len(dump.tokens), settings.held_out, settings.seed)
    if settings.max_windows:
        train_ids = train_ids[: settings.max_windows]
    eval_ids = eval_ids[: settings.eval_windows]
    if len(train_ids) == 0:
        raise ValueError("no training windows: dump more tokens")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_scale(s, settings))
    order_rng = np.random.default_rng(settings.seed + 1)
    noise_gen = torch.Generator().manual_seed(settings.seed + 2)
    ckpt = out_dir / CHECKPOINT
    step, history, seconds, tokens_seen = _resume(ckpt, settings, model, opt, sched, order_rng, noise_gen)
    loss_head = _loss_head(model, dump, settings, train_ids)
    model.train()
    bar = tqdm(total=settings.steps, initial=step, desc=desc, dynamic_ncols=True)
    acc1 = acc2 = acc3 = float("nan")
    loss_value = float("nan")
    while step < settings.steps:
        t0 = time.perf_counter()
        batch = order_rng.choice(train_ids, size=min(settings.batch, len(train_ids)), replace=False)
        batch.sort()
        feats, tokens, mask = _batch_tensors(dump, batch)
        tokens_seen += int(mask.sum())
        loss, feature_loss, ce_loss = drafter_loss(model, feats, tokens, mask, settings.noise,
                                                   settings.ce_weight, noise_gen, loss_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        opt.step()
        sched.step()
        step += 1
        seconds += time.perf_counter() - t0
        loss_value = float(loss.detach())
        entry = {"step": step, "loss": round(loss_value, 5), "feature_loss": round(float(feature_loss), 5),
                 "ce": round(float(ce_loss), 4)}
        if step % settings.eval_every == 0 or step == settings.steps:
            model.eval()
            acc1, acc2, acc3 = held_out_acceptance(model, dump, eval_ids, full_head)
            model.train()
            entry.update(acc1=round(acc1, 4), acc2=round(acc2, 4), acc3=round(acc3, 4),
                         chain_tau=round(expected_chain_tau((acc1, acc2, acc3)), 3), tokens_seen=tokens_seen)
        history.append(entry)
        bar.set_postfix(loss=f"{loss_value:.3f}", ce=f"{float(ce_loss):.2f}", acc1=f"{acc1:.2f}",
                        acc2=f"{acc2:.2f}", tau3=f"{expected_chain_tau((acc1, acc2, acc3)):.2f}")
        bar.update(1)
        if step % settings.checkpoint_every == 0 or step == settings.steps:
            _save_checkpoint(ckpt, model, opt, sched, order_rng, noise_gen, step, history, seconds, settings,
                             tokens_seen)
    bar.close()
    model.eval()
    if math.isnan(acc1) and len(eval_ids):
        acc1, acc2, acc3 = held_out_acceptance(model, dump, eval_ids, full_head)
    return TrainReport(step, len(train_ids), int(dump.span_mask(train_ids).sum()), round(seconds, 1),
                       loss_value, acc1, acc2, history, acc3)


def _resume(ckpt: Path, settings: TrainSettings, model, opt, sched, order_rng, noise_gen):
    """Restore an interrupted run from ``ckpt`` (if any); (step, history, seconds, tokens seen)."""
    if not ckpt.exists():
        return 0, [], 0.0, 0
    state = torch.load(ckpt, weights_only=True)  # plain tensors and containers: nothing is unpickled
    if state["settings"] != asdict(settings):
        raise RuntimeError(f"{ckpt} was written with other settings; remove it to start over")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    order_rng.bit_generator.state = state["order_rng"]
    noise_gen.set_state(state["noise_gen"])
    return state["step"], state["history"], state["seconds"], state.get("tokens_seen", 0)


def _loss_head(model, dump: FeatureDump, settings: TrainSettings, train_ids) -> torch.Tensor | None:
    """The head rows of the ``loss_vocab`` most frequent training tokens (None: the whole head)."""
    if not settings.loss_vocab or settings.loss_vocab >= model.head_weight.shape[0]:
        return None
    top = top_ids(dump.token_counts(model.head_weight.shape[0], train_ids), settings.loss_vocab)
    rows = torch.from_numpy(top) if model.vocab_ids is None else torch.from_numpy(
        np.flatnonzero(np.isin(model.vocab_ids.numpy(), top)))
    return model.head_weight[rows].contiguous()


def _batch_tensors(dump: FeatureDump, batch: np.ndarray):
    """(features, tokens, loss mask) of these windows, cut to the longest one's width."""
    width = int(dump.spans[batch, 1].max())  # padding past the batch's longest window is dropped
    feats = torch.from_numpy(np.asarray(dump.features[batch, :width], dtype=np.float32))
    tokens = torch.from_numpy(np.asarray(dump.tokens[batch, :width], dtype=np.int64))
    # input position t predicts the feature of t+1: trained where t+1 is a trained token
    mask = torch.from_numpy(dump.span_mask(batch)[:, 1:width]).float()
    return feats, tokens, mask


def _lr_scale(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _save_checkpoint(path: Path, model, opt, sched, order_rng, noise_gen, step, history, seconds, settings,
                     tokens_seen):
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "order_rng": order_rng.bit_generator.state, "noise_gen": noise_gen.get_state(), "step": step,
                "history": history, "seconds": seconds, "settings": asdict(settings),
                "tokens_seen": tokens_seen}, tmp)
    tmp.replace(path)
