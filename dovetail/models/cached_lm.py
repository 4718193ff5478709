"""An HF causal LM with a KV cache that takes tree-shaped blocks and commits one path.

The cache holds ``committed`` entries (a causal prefix) followed by *pending* entries: draft-tree
nodes written by ``forward_tree`` during the current step. A tree block attends to the whole
committed prefix, to the pending entries that are its ancestors, and to its own ancestors inside
the block (a 4D float mask, positions ``base + depth``). ``commit(path)`` keeps the pending entries
on one root-to-leaf path, moves them to contiguous positions right after the prefix, and drops
the rest. Any transformers decoder of ``architectures.py`` works: only its forward is used.

Features: with ``keep_hidden=True`` every forward also leaves its last-layer hidden states (after
the final norm) in ``last_hidden``, which is what a feature drafter reads. A feature drafter itself
(``models/drafter_net.py``) is driven the same way, with a ``features`` row per fed token; its
``last_hidden`` holds its predicted next features.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from dovetail.models import fast_forward
from dovetail.models.architectures import sliding_window
from dovetail.models.row_attention import windowed
from dovetail.models.kv_cache import AppendingLayer, appending_cache
from dovetail.models.tree import ancestry_matrix


class CachedLM:
    def __init__(self, model: torch.nn.Module, keep_hidden: bool = False):
        self.model = model.eval()
        self.keep_hidden = keep_hidden
        self.last_hidden: torch.Tensor | None = None  # [n, H] of the last forward (see module doc)
        self.config = model.config
        self.dtype = model.dtype
        # the layers' attention windows (None: full), read once: a config's attributes are slow to read
        self.windows = frozenset(sliding_window(self.config, i) for i in range(self.config.num_hidden_layers))
        self.device = next(model.parameters()).device  # the draft may live on a GPU
        # quantized models run a lean forward of their own (same modules and cache)
        self.fast = fast_forward.FastForward(model) if fast_forward.supports(model) else None
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def fresh(self) -> "CachedLM":
        """Another cache over the same model (a new request's)."""
        other = copy.copy(self)
        other.reset()
        return other

    def reset(self) -> None:
        self.cache = appending_cache(self.config)
        self.committed = 0
        self._pending_nodes: list[int] = []

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # -- forwards ------------------------------------------------------------------------
    @torch.inference_mode()
    def extend(self, tokens, logits_to_keep: int = 1, features: torch.Tensor | None = None) -> torch.Tensor:
        """Append committed tokens causally; return logits of the last ``logits_to_keep`` positions."""
        if self._pending_nodes:
            raise RuntimeError("commit the pending tree before extending the prefix")
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device).view(1, -1)
        positions = torch.arange(self.committed, self.committed + ids.shape[1], device=self.device).view(1, -1)
        logits = self._forward(ids, positions, None, logits_to_keep, features)
        self.committed += ids.shape[1]
        return logits

    def forward_tree(self, tokens: np.ndarray, parents: np.ndarray, nodes, base_position: int,
                     features: torch.Tensor | None = None) -> torch.Tensor:
        """Write tree ``nodes`` (indices into ``tokens``/``parents``) as pending entries.

        Later calls of the same step may add deeper nodes (the tree may have grown meanwhile;
        node ids must stay stable) whose ancestors are pending or in the prefix. Returns the
        logits of the given nodes, [len(nodes), vocab].
        """
        return forward_blocks([self], [TreeBlock(tokens, parents, nodes, base_position)], features)[0]

    def _forward(self, ids, positions, mask, logits_to_keep, features, cache=None) -> torch.Tensor:
        """``logits_to_keep``: the last n positions (0: all) or a 1-D tensor of positions."""
        kw = dict(position_ids=positions, attention_mask=mask, cache=self.cache if cache is None else cache,
                  use_cache=True)
        if features is not None:  # a feature drafter: its output carries the predicted features
            out = self.model(input_ids=ids, features=features.to(self.device)[None], logits_to_keep=logits_to_keep, **kw)
            self.last_hidden = out.hidden[0]
            return out.logits[0].float()
        if self.fast is not None:
            hidden = self.fast.hidden(ids, positions, mask, kw["cache"])
            if self.keep_hidden:
                self.last_hidden = hidden
            return self.model.lm_head(_kept_positions(hidden, logits_to_keep)).float()
        if not self.keep_hidden:
            return self.model(input_ids=ids, logits_to_keep=logits_to_keep, **kw).logits[0].float()
        hidden = self.model.model(input_ids=ids, **kw).last_hidden_state
        self.last_hidden = hidden[0]
        return self.model.lm_head(_kept_positions(hidden, logits_to_keep))[0].float()

    @torch.inference_mode()
    def commit(self, path) -> int:
        """Keep the pending entries of ``path`` (tree nodes, root first), in order, contiguous.

        Entries are kept while the path's nodes are pending; returns how many were kept, so the
        caller knows which path tokens still have to be fed.
        """
        where = {node: i for i, node in enumerate(self._pending_nodes)}
        kept = []
        for node in path:
            if node not in where:
                break
            kept.append(where[node])
        if self._pending_nodes:
            # Only the pending tail moves (a chain's accepted prefix is already in place): copying the
            # whole cache every step would cost as much as the attention over it.
            end = self.committed + len(kept)
            moved = kept != list(range(len(kept)))
            index = torch.tensor([self.committed + i for i in kept], dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                if moved:
                    layer.keys[:, :, self.committed:end] = layer.keys.index_select(2, index)
                    layer.values[:, :, self.committed:end] = layer.values.index_select(2, index)
                layer.keep(end)
        self.committed += len(kept)
        self._pending_nodes = []
        return len(kept)

    def rollback(self, length: int) -> None:
        """Drop everything after the first ``length`` committed entries (and any pending)."""
        self.commit([])
        drop = self.committed - length
        if drop > 0:
            self.cache.crop(-drop)
            self.committed = length



def _kept_positions(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """The rows (positions, dim -2) of ``hidden`` whose logits are wanted (see ``_forward``)."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden[..., logits_to_keep, :]
    return hidden[..., -logits_to_keep:, :] if logits_to_keep else hidden


def additive_mask(allowed: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" matrix as the additive float mask the models take (0 or dtype min)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)


def layer_masks(windows: frozenset, allowed: torch.Tensor, query_positions: torch.Tensor,
                key_positions: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor | dict[str, torch.Tensor]:
    """The additive mask a forward takes for ``allowed`` [queries, keys], given the model's layers'
    ``windows`` (``CachedLM.windows``): with sliding-window layers the window is cut from it too, in
    one mask for every layer, or one per layer type where sliding layers sit beside full ones (the
    form transformers' Gemma 3 takes)."""
    def additive(window: int | None) -> torch.Tensor:
        seen = allowed if window is None else windowed(allowed, query_positions, key_positions, window)
        return additive_mask(seen.numpy(), dtype).to(device)[None, None]

    if len(windows) == 1:
        return additive(next(iter(windows)))
    return {"full_attention": additive(None), "sliding_attention": additive(max(w for w in windows if w))}


@dataclass
class TreeBlock:
    """Tree ``nodes`` (indices into ``tokens``/``parents``) to write as pending entries of one cache,
    at positions ``base_position + depth``. They see the committed prefix, their pending ancestors
    (written earlier in this step) and their ancestors among themselves."""

    tokens: np.ndarray
    parents: np.ndarray
    nodes: np.ndarray
    base_position: int

    @classmethod
    def whole(cls, tree, lm: CachedLM) -> "TreeBlock":
        """A whole tree whose root is the token after ``lm``'s committed prefix (a verification)."""
        return cls(tree.tokens, tree.parents, np.arange(len(tree)), lm.committed)


@torch.inference_mode()
def forward_blocks(lms: list[CachedLM], blocks: list[TreeBlock], features: torch.Tensor | None = None,
                   last_only: bool = False) -> list[torch.Tensor]:
    """One forward over several caches' tree blocks (one block per cache); returns each block's
    logits (``last_only``: of its last node only, the LM head skipping the others).

    ``lms`` are caches of one model (one request each). With several, their entries (committed and
    pending) are laid side by side in a scratch cache and the blocks follow, each at its own
    positions, under a block mask: a node sees only its own cache and its own ancestors. The point:
    the weights stream once for every request. Afterwards each cache holds its block as pending
    entries, exactly as if it had run alone, so ``commit`` works unchanged.
    """
    first = lms[0]
    contexts = [lm.committed + len(lm._pending_nodes) for lm in lms]
    nodes = [np.asarray(b.nodes, dtype=np.int64) for b in blocks]
    total_context, total_nodes = sum(contexts), sum(len(n) for n in nodes)
    allowed = np.zeros((total_nodes, total_context + total_nodes), dtype=bool)
    key_positions = np.zeros(total_context + total_nodes, dtype=np.int64)
    ids, positions = [], []
    row = col = 0
    for lm, block, new, context in zip(lms, blocks, nodes, contexts):
        anc = ancestry_matrix(np.asarray(block.parents, dtype=np.int64))
        depth = anc.sum(1) - 1
        pending = np.asarray(lm._pending_nodes, dtype=np.int64)
        visible = anc[new]  # ancestry rows of the new nodes over the whole tree
        rows, fresh = slice(row, row + len(new)), slice(total_context + row, total_context + row + len(new))
        allowed[rows, col:col + lm.committed] = True
        allowed[rows, col + lm.committed:col + context] = visible[:, pending]
        allowed[rows, fresh] = visible[:, new]
        key_positions[col:col + lm.committed] = np.arange(lm.committed)
        key_positions[col + lm.committed:col + context] = block.base_position + depth[pending]
        key_positions[fresh] = block.base_position + depth[new]
        ids.append(np.asarray(block.tokens, dtype=np.int64)[new])
        positions.append(block.base_position + depth[new])
        row, col = row + len(new), col + context
    positions = torch.from_numpy(np.concatenate(positions))
    mask = layer_masks(first.windows, torch.from_numpy(allowed), positions, torch.from_numpy(key_positions),
                       first.dtype, first.device)
    ids = torch.from_numpy(np.concatenate(ids)).to(first.device).view(1, -1)
    positions = positions.to(first.device).view(1, -1)
    sizes = [len(new) for new in nodes]
    keep = torch.tensor(np.cumsum(sizes) - 1, device=first.device) if last_only else 0
    if len(lms) == 1:  # alone: straight into its own cache
        logits = first._forward(ids, positions, mask, keep, features)
        first._pending_nodes.extend(int(n) for n in nodes[0])
        return [logits]
    scratch = DynamicCache()  # appending layers keep every row (a sliding one would drop some)
    scratch.layers = [AppendingLayer.joined([lm.cache.layers[i] for lm in lms], total_nodes)
                      for i in range(len(first.cache.layers))]
    logits = first._forward(ids, positions, mask, keep, features, cache=scratch)
    hidden = first.last_hidden
    out, row = [], 0
    for i, (lm, new) in enumerate(zip(lms, nodes)):
        fresh = slice(total_context + row, total_context + row + len(new))
        for layer, merged in zip(lm.cache.layers, scratch.layers):
            layer.update(merged.keys[:, :, fresh], merged.values[:, :, fresh])  # appended in place
        lm._pending_nodes.extend(int(n) for n in new)
        if lm.keep_hidden:
            lm.last_hidden = hidden[row:row + len(new)]
        out.append(logits[i:i + 1] if last_only else logits[row:row + len(new)])
        row += len(new)
    return out


def forward_trees(lms: list[CachedLM], trees: list) -> list[torch.Tensor]:
    """Verify several requests' whole trees in one forward (see ``forward_blocks``)."""
    if any(lm._pending_nodes for lm in lms):
        raise RuntimeError("commit every pending tree before a batched forward")
    return forward_blocks(lms, [TreeBlock.whole(tree, lm) for tree, lm in zip(trees, lms)])


def extend_together(lms: list[CachedLM], feeds: list[list[int]]) -> list[torch.Tensor]:
    """Append committed tokens to several caches in one forward; each one's last logits, [1, vocab]."""
    chains = [TreeBlock(np.asarray(feed, dtype=np.int64), np.arange(-1, len(feed) - 1), np.arange(len(feed)),
                        lm.committed) for lm, feed in zip(lms, feeds)]
    logits = forward_blocks(lms, chains, last_only=True)
    for lm, feed in zip(lms, feeds):
        lm.commit(range(len(feed)))
    return logits
