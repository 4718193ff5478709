"""An HF causal LM with a KV cache that takes tree-shaped blocks and commits one path.

The cache holds ``committed`` entries (a causal prefix) followed by *pending* entries: draft-tree
nodes written by ``forward_tree`` during the current step. A tree block attends to the whole
committed prefix, to the pending entries that are its ancestors, and to its own ancestors inside
the block (a 4D float mask, positions ``base + depth``). ``commit(path)`` keeps the pending entries
on one root-to-leaf path, moves them to contiguous positions right after the prefix, and drops
the rest. Any transformers Llama/Qwen2/Mistral-style model works: only its forward is used.

Features: with ``keep_hidden=True`` every forward also leaves its last-layer hidden states (after
the final norm) in ``last_hidden``, which is what a feature drafter reads. A feature drafter itself
(``models/dgf.py``) is driven the same way, with a ``features`` row per fed token; its
``last_hidden`` holds its predicted next features.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache

from dovetail.models.tree import ancestry_matrix


class CachedLM:
    def __init__(self, model: torch.nn.Module, keep_hidden: bool = False):
        self.model = model.eval()
        self.keep_hidden = keep_hidden
        self.last_hidden: torch.Tensor | None = None  # [n, H] of the last forward (see module doc)
        self.config = model.config
        self.dtype = model.dtype
        self.device = next(model.parameters()).device  # the draft may live on a GPU
        self.reset()

    # -- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        self.cache = DynamicCache(config=self.config)
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

    @torch.inference_mode()
    def forward_tree(self, tokens: np.ndarray, parents: np.ndarray, nodes, base_position: int,
                     features: torch.Tensor | None = None) -> torch.Tensor:
        """Write tree ``nodes`` (indices into ``tokens``/``parents``) as pending entries.

        Later calls of the same step may add deeper nodes (the tree may have grown meanwhile;
        node ids must stay stable) whose ancestors are pending or in the prefix. Returns the
        logits of the given nodes, [len(nodes), vocab].
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        anc = ancestry_matrix(np.asarray(parents, dtype=np.int64))
        depth = anc.sum(1) - 1
        visible = anc[nodes]  # [m, n] ancestry rows of the new nodes
        cols = np.concatenate([np.asarray(self._pending_nodes, dtype=np.int64), nodes])
        allowed = np.ones((len(nodes), self.committed + len(cols)), dtype=bool)
        allowed[:, self.committed:] = visible[:, cols]
        mask = additive_mask(allowed, self.dtype)
        ids = torch.as_tensor(tokens[nodes], dtype=torch.long, device=self.device).view(1, -1)
        positions = torch.as_tensor(base_position + depth[nodes], device=self.device).view(1, -1)
        logits = self._forward(ids, positions, mask.to(self.device)[None, None], 0, features)
        self._pending_nodes.extend(int(n) for n in nodes)
        return logits

    def _forward(self, ids, positions, mask, logits_to_keep: int, features, cache=None) -> torch.Tensor:
        kw = dict(position_ids=positions, attention_mask=mask, cache=self.cache if cache is None else cache,
                  use_cache=True)
        if features is not None:  # a feature drafter: its output carries the predicted features
            out = self.model(input_ids=ids, features=features.to(self.device)[None], logits_to_keep=logits_to_keep, **kw)
            self.last_hidden = out.hidden[0]
            return out.logits[0].float()
        if not self.keep_hidden:
            return self.model(input_ids=ids, logits_to_keep=logits_to_keep, **kw).logits[0].float()
        hidden = self.model.model(input_ids=ids, **kw).last_hidden_state
        self.last_hidden = hidden[0]
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return self.model.lm_head(hidden)[0].float()

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
            index = torch.tensor([*range(self.committed), *(self.committed + i for i in kept)], device=self.device)
            for layer in self.cache.layers:
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)
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



def additive_mask(allowed: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """A boolean "may attend" matrix as the additive float mask the models take (0 or dtype min)."""
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill_(torch.from_numpy(~allowed), torch.finfo(dtype).min)


@torch.inference_mode()
def forward_trees(lms: list[CachedLM], trees: list) -> list[torch.Tensor]:
    """One forward over several requests' draft trees, each against its own cache.

    ``lms`` are per-request caches of one model. Their committed prefixes are laid side by side in
    a scratch cache and the trees' nodes follow, each at its own positions; a block mask lets a
    node see only its own request's prefix and its own ancestors. Afterwards every ``lm`` holds its
    tree as pending entries, as after its own ``forward_tree``, so ``commit`` works unchanged.
    Returns each tree's logits. The point: the weights stream once for all requests.
    """
    first = lms[0]
    if any(lm._pending_nodes for lm in lms):
        raise RuntimeError("commit every pending tree before a batched forward")
    prefixes, sizes = [lm.committed for lm in lms], [len(tree) for tree in trees]
    total_prefix, total_nodes = sum(prefixes), sum(sizes)
    allowed = np.zeros((total_nodes, total_prefix + total_nodes), dtype=bool)
    ids, positions = [], []
    row = col = 0
    for tree, prefix, size in zip(trees, prefixes, sizes):
        anc = tree.ancestry()
        allowed[row:row + size, col:col + prefix] = True
        allowed[row:row + size, total_prefix + row:total_prefix + row + size] = anc
        ids.append(np.asarray(tree.tokens, dtype=np.int64))
        positions.append(prefix + anc.sum(1) - 1)
        row, col = row + size, col + prefix
    mask = additive_mask(allowed, first.dtype)
    scratch = DynamicCache(config=first.config)
    for i in range(len(first.cache.layers)):
        scratch.update(torch.cat([lm.cache.layers[i].keys for lm in lms], dim=2),
                       torch.cat([lm.cache.layers[i].values for lm in lms], dim=2), i)
    device = first.device
    logits = first._forward(torch.from_numpy(np.concatenate(ids)).to(device).view(1, -1),
                            torch.from_numpy(np.concatenate(positions)).to(device).view(1, -1),
                            mask.to(device)[None, None], 0, None, cache=scratch)
    hidden = first.last_hidden
    out, row = [], 0
    for lm, size in zip(lms, sizes):
        new = slice(total_prefix + row, total_prefix + row + size)
        for layer, merged in zip(lm.cache.layers, scratch.layers):
            layer.keys = torch.cat([layer.keys, merged.keys[:, :, new]], dim=2)
            layer.values = torch.cat([layer.values, merged.values[:, :, new]], dim=2)
        lm._pending_nodes = list(range(size))
        if lm.keep_hidden:
            lm.last_hidden = hidden[row:row + size]
        out.append(logits[row:row + size])
        row += size
    return out
