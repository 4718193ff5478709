"""Verification of a draft tree against the target's logits: greedy and lossless sampling.

Greedy: walk from the root, follow the child whose token equals the target's argmax, stop when
none does; the target's argmax at the last accepted node is the bonus token.

Sampling, at each accepted node, by how its children were chosen:

* Fixed choices (a text proposer's continuations, a draft's top-k: each candidate's proposal is a
  point mass). The token at sequence position t is sampled from the target's (warped)
  distribution there by inverse CDF with one uniform number that depends on the request's seed
  and t alone (``position_uniform``); the walk accepts the child holding that token, else that
  token is the bonus. Child c is then accepted with probability p(c), and siblings together with
  the sum of theirs, exactly as multi-candidate rejection sampling with point masses. Since a
  position's token never depends on the tree, a seeded request gives the same output whatever
  the speculation chose, speculation off included.
* Children drawn from the draft's distribution q without replacement (``DraftSampler``; the tree
  carries q). Recursive rejection sampling: child x_i is accepted with probability
  min(1, p_i(x_i) / q_i(x_i)); on rejection p_{i+1} = norm(max(0, p_i - q_i)) and q_{i+1} is q_i
  without x_i; if every child is rejected the token is drawn from the last p. Each position
  again emits exactly p, and a child is accepted with probability sum(min(p, q)) rather than
  p(argmax q), which is what makes speculation pay at high temperatures. The output now depends
  on the draws, so the draft samples only when the request's seed was not given by the caller
  (``SamplingParams.draft_samples``): a caller's seed keeps its output independent of speculation.

Temperature, top-k and top-p are applied to the target's logits first (in HF's order), so the
guarantee covers them; the draft's q is warped the same way.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from dovetail.kernels import ops
from dovetail.models.tree import DraftTree
from dovetail.sampling import SamplingParams


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Warp logits [n, V] into sampling probabilities: temperature, then top-k, then top-p (HF's
    order), as float32 [n, V] with exact zeros where a filter removed a token.

    The row max is subtracted before dividing (inside the softmax), so a small temperature cannot
    overflow to inf (and NaN probabilities); every accepted non-greedy temperature is >=
    ``sampling.GREEDY_BELOW``. The filters run natively (``filter_probs_``, kernels/csrc/sampling.cpp):
    a histogram of the row finds the cut, so the row is never sorted."""
    probs = (logits.float() / params.temperature).softmax(dim=-1)
    top_k = params.top_k if 0 < params.top_k < probs.shape[-1] else 0
    if top_k or params.top_p < 1.0:
        probs = probs.contiguous()
        ops().filter_probs_(probs, top_k, params.top_p)
    return probs


class WarpedRows:
    """``target_probs`` of one row of ``logits`` at a time, when first asked for: verifying a tree
    visits only the accepted path's nodes, so the other rows are never warped."""

    def __init__(self, logits: torch.Tensor, params: SamplingParams):
        self.logits, self.params, self.rows = logits, params, {}

    def __getitem__(self, node: int) -> torch.Tensor:
        if node not in self.rows:
            self.rows[node] = target_probs(self.logits[node:node + 1], self.params)[0]
        return self.rows[node]


@dataclass
class AcceptedPath:
    """Result of verifying one tree: the accepted root-to-node path and the committed tokens
    (accepted draft tokens followed by the bonus token); for a feature drafter, the target's
    features at the path's nodes (one row per committed token)."""

    path: list[int]
    tokens: list[int]
    features: torch.Tensor | None = None

    @property
    def accepted_draft_tokens(self) -> int:
        return len(self.path) - 1


def accept_greedy(tree: DraftTree, logits: torch.Tensor) -> AcceptedPath:
    best = logits.argmax(dim=-1).tolist()
    path, node = [0], 0
    while True:
        children = tree.children(node)
        match = [c for c in children if tree.tokens[c] == best[node]]
        if not match:
            break
        node = int(match[0])
        path.append(node)
    return AcceptedPath(path, [int(tree.tokens[n]) for n in path[1:]] + [best[node]])


def accept_sampling(tree: DraftTree, probs, seed: int, position: int) -> AcceptedPath:
    """``probs[n]``: the target's distribution after tree node n (a tensor [n, V], or ``WarpedRows``
    that warps only the rows the walk visits); ``position``: the sequence index of the token sampled
    after the root (node n's follows at ``position + depth(n)``)."""
    path, node = [0], 0
    while True:
        at = position + len(path) - 1
        children = tree.children(node)
        proposal = tree.proposal(node) if len(children) else None
        if proposal is None:
            token = sample_token(probs[node], seed, at)
            match = [int(c) for c in children if tree.tokens[c] == token]
            child = match[0] if match else None
        else:
            child, token = reject_against(probs[node], proposal, [int(c) for c in children],
                                          [int(tree.tokens[c]) for c in children], seed, at)
        if child is None:
            return AcceptedPath(path, [int(tree.tokens[n]) for n in path[1:]] + [token])
        node = child
        path.append(node)


def reject_against(p: torch.Tensor, proposal: tuple, children: list[int], tokens: list[int], seed: int,
                   position: int) -> tuple[int | None, int]:
    """Recursive rejection sampling of one position over children drawn from q without
    replacement (in ``children`` order). Returns (the accepted child, its token), or (None, the
    token drawn from what is left of p).

    q is sparse (the draft's support), so p only ever changes there: it is kept unnormalised as
    the original p off the support and ``r`` on it, with total ``mass``; a rejection updates ``r``
    (max(0, p - q) scaled by ``mass``), and the dense residual is built once, for the final draw."""
    q_tokens, q_probs = (np.asarray(a) for a in proposal)
    held = q_probs > 0  # a row is padded with zeros past the draft's support
    support = torch.as_tensor(q_tokens[held], dtype=torch.long)
    q = torch.as_tensor(q_probs[held], dtype=torch.float64)
    q = q / q.sum()
    r = p[support].double()
    off_support = float(p.sum(dtype=torch.float64)) - float(r.sum())
    where = {int(t): i for i, t in enumerate(support.tolist())}
    for i, (child, token) in enumerate(zip(children, tokens)):
        j = where.get(token)
        if j is None or float(q[j]) <= 0.0:
            break  # not drawn from q (cannot happen for a well-formed tree): draw from p as it is
        mass = off_support + float(r.sum())
        if position_uniform(seed, position, f"accept{i}") * float(q[j]) * mass < float(r[j]):
            return child, token
        rest = (r - mass * q).clamp_min_(0.0)
        if off_support + float(rest.sum()) <= 1e-12 * mass:  # p and q agree to rounding: nothing left
            break
        r = rest
        q[j] = 0.0
        if float(q.sum()) <= 0.0:
            break
        q = q / q.sum()
    residual = p.clone()
    residual[support] = r.to(residual.dtype)
    return None, sample_token(residual, seed, position)


class DraftSampler:
    """How a draft model draws a node's children from its own distribution q: the draft's
    log-probabilities warped by the request's temperature, top-k and top-p (as the target's),
    cut to its ``support`` most likely tokens and renormalised (q travels with the tree, so it
    stays small), then ``k`` children drawn without replacement (Gumbel top-k) with the draft's
    own generator. The draws need never be reproduced: exactness only needs them independent of
    the target's."""

    support = 64

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))

    def draw(self, log_probs: torch.Tensor, k: int):
        """For each row of ``log_probs`` [f, V]: the children's log q [f, k] (-inf where q has
        fewer than k tokens), their tokens [f, k], and q itself as (tokens, probs) [f, support]."""
        q = target_probs(log_probs, self.params)
        q_probs, q_tokens = torch.topk(q, min(self.support, q.shape[-1]), dim=-1)
        q_probs = q_probs / q_probs.sum(dim=-1, keepdim=True)
        uniform = torch.rand(q_probs.shape, generator=self.generator, dtype=torch.float64).clamp_(1e-300, 1.0)
        keys = q_probs.double().log() - (-uniform.log()).log()
        order = torch.topk(keys, min(k, keys.shape[-1]), dim=-1).indices
        return (q_probs.gather(-1, order).log(), q_tokens.gather(-1, order),
                (q_tokens.numpy(), q_probs.float().numpy()))


def position_uniform(seed: int, position: int, stream: str = "") -> float:
    """A uniform number in [0, 1) that is a function of (seed, position, stream) alone,
    independent across all three; stream "" draws the position's token itself."""
    key = f"{seed}:{position}" + (f":{stream}" if stream else "")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)


def sample_token(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at ``position``: inverse CDF of ``probs`` (in token order) at
    ``position_uniform(seed, position)``. Natively (``draw_token``): the blocks' masses locate the
    block holding the number and only that block is accumulated, so the CDF is never built over
    the whole row. A token of zero probability is never drawn (the CDF does not rise at it)."""
    return int(ops().draw_token(probs.reshape(-1), position_uniform(seed, position)))
