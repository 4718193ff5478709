"""Quantized models: GGUF block weights run as they are, or float checkpoints quantized on load.

Precisions (``--target-precision`` / ``--draft-precision``):
  ``native``  the GGUF file's own blocks (Q4_K, Q6_K, Q5_0, Q8_0, ...), repacked, never widened;
  ``int8``    a float checkpoint quantized on load to Q8_0 (32-weight groups, round to nearest);
  ``int4``    the same to Q4_K (Q4_0 where a row is not a multiple of 256 weights);
  ``fp32``    dense floats (the dequantized checkpoint), token-identical to HF fp32;
  ``auto``    ``native`` for a model folder holding a GGUF file, else the role's float default.

Every linear becomes a ``QuantLinear`` and the token embedding a ``QuantEmbedding`` (rows
dequantized on lookup, exactly); norms and biases stay fp32. The rest of the HF module runs
unchanged, so caching, tree masks and tensor parallelism work as for fp32 models.

Tensor parallelism: a shard decodes only its own rows (output splits) or its own super-blocks
(input splits) of each tensor, straight from the memory-mapped GGUF file. The MLP is split on
super-block boundaries, so an intermediate size that is not a multiple of ``256 * shards`` (e.g.
8960 = 35 super-blocks) gets an uneven split.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from dovetail.errors import UserError
from dovetail.kernels import kernel_isa, ops
from gguf import GGML_QUANT_SIZES

from dovetail.models.architectures import by_gguf_name
from dovetail.models.gguf_index import open_index
from dovetail.models.precision import FLOAT_TYPES, gguf_file, unsupported_message
from dovetail.models.slices import Span, SliceReader, shard_spans, split_of, weight_files
from dovetail.kernels.formats import SCHEMES
from dovetail.kernels.arena import WeightArena
from dovetail.kernels.packing import Decoded, PackedWeight, decode, encode, pack, precision_format


EMBED_NAME = "model.embed_tokens.weight"


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with W in the kernel's packed layout (inference only)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.qtype = packed.cols, packed.rows, packed.qtype
        for name in ("q", "D", "Dm", "sc", "mn"):
            self.register_buffer(name, getattr(packed, name), persistent=False)
        self.scheme = packed.scheme_args()
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        self.isa = kernel_isa()
        # the kernel's arguments, gathered once: a module attribute lookup per call costs more than
        # a small linear's arithmetic (buffers are never reassigned after construction)
        self._weight_args = (self.q, self.D, self.Dm, self.sc, self.mn, self.out_features, *self.scheme, self.isa,
                             self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.forward_quantized(*ops().quantize_rows(x.reshape(-1, self.in_features), self.isa))
        return y.view(*shape[:-1], self.out_features)

    def forward_quantized(self, xq: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """[M, out] from activations already quantized by ``ops().quantize_rows`` (shareable
        between linears that read the same input)."""
        return ops().qmatmul_quantized(xq, xs, *self._weight_args)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of W as fp32 (exact): the whole matrix by default."""
        rows = torch.arange(self.out_features) if rows is None else rows
        return ops().dequantize_rows(self.q, self.D, self.Dm, self.sc, self.mn, self.out_features, self.in_features,
                                     *self.scheme, rows)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.D, self.Dm, self.sc, self.mn))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.qtype.name}"


class QuantEmbedding(nn.Module):
    """A token embedding kept quantized: looked-up rows are dequantized exactly (then multiplied by
    ``scale`` where the model scales its embeddings, as Gemma does by sqrt(hidden))."""

    def __init__(self, table: QuantLinear, scale: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.scale = None if scale is None else scale.float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table.dequantize(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)
        return rows if self.scale is None else rows * self.scale


# -- where tensors come from ---------------------------------------------------------------------
class GGUFSource:
    """HF parameter names -> tensors of a GGUF file (memory-mapped; only touched blocks are read)."""

    def __init__(self, path: Path, config):
        import gguf

        index = open_index(path)
        arch = index.architecture
        arch_id = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
        self.family = by_gguf_name(arch)
        if arch_id is None or self.family is None:
            raise UserError(f"{path}: GGUF architecture {arch!r} does not run natively")
        self.index = index
        self.names = gguf.TensorNameMap(arch_id, config.num_hidden_layers)
        self.tensors = index.tensors
        self.config = config

    def _tensor(self, name: str):
        key = self.names.get_name(name, try_suffixes=(".weight", ".bias"))
        return self.tensors.get(key) if key else None

    def has(self, name: str) -> bool:
        return self._tensor(name) is not None

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """llama.cpp stores Llama q/k rows interleaved for its RoPE; HF's order is restored here."""
        if not self.family.permuted_qk:
            return None
        m = re.search(r"self_attn\.([qk])_proj\.", name)
        if not m:
            return None
        heads = self.config.num_attention_heads if m.group(1) == "q" else self.config.num_key_value_heads
        head_dim = rows // heads
        half = np.arange(head_dim // 2)
        return (np.arange(heads)[:, None, None] * head_dim + np.arange(2)[None, :, None]
                + 2 * half[None, None, :]).reshape(-1)

    def dense(self, name: str, rows: list[Span] | None = None) -> torch.Tensor:
        t = self._tensor(name)
        data = np.asarray(t.data)
        if t.tensor_type.name == "BF16":  # the index keeps its bytes: widen to the float32 bits
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif t.tensor_type.name not in FLOAT_TYPES:
            import gguf

            data = gguf.quants.dequantize(data, t.tensor_type)
        data = data.reshape([int(s) for s in reversed(t.shape)]) if data.ndim > 1 or len(t.shape) > 1 else data
        order = self._row_order(name, data.shape[0])
        if order is not None:
            data = data[order]
        if rows is not None:
            data = np.concatenate([data[lo:hi] for lo, hi in rows])
        data = np.array(data, dtype=np.float32)
        if self.family.norm_offset and name.endswith("norm.weight"):
            data -= np.float32(self.family.norm_offset)  # HF's parameter (its norm adds the offset back)
        self.index.release(t)
        return torch.from_numpy(data)

    def format_of(self, name: str):
        """The tensor's block format, or None for a float tensor (kept dense); any other format is
        refused: a layer never silently becomes fp32."""
        t = self._tensor(name)
        if t.tensor_type in SCHEMES:
            return t.tensor_type
        if t.tensor_type.name in FLOAT_TYPES:
            return None
        raise UserError(unsupported_message(self.index.path, t.name, t.tensor_type.name))

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        t = self._tensor(name)
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)
        order = self._row_order(name, len(raw))
        if order is not None:
            raw = raw[order]
        decoded = decode_blocks(raw, t.tensor_type, int(t.shape[0]), rows, cols)
        self.index.release(t)
        return decoded


def decode_blocks(raw: np.ndarray, qtype, n_cols: int, rows: list[Span] | None, cols: Span | None) -> Decoded:
    """Rows ``rows`` and columns ``cols`` of a weight held as GGUF blocks ``raw`` [rows, bytes],
    in integer form. Columns are cut on whole blocks (the caller split on super-block boundaries)."""
    if rows is not None:
        raw = np.concatenate([raw[lo:hi] for lo, hi in rows])
    per, size = GGML_QUANT_SIZES[qtype]
    if cols is not None:
        raw = raw.reshape(len(raw), n_cols // per, size)[:, cols[0] // per:cols[1] // per].reshape(len(raw), -1)
        n_cols = cols[1] - cols[0]
    return decode(np.ascontiguousarray(raw), qtype, len(raw), n_cols)


class FloatSource:
    """A float safetensors checkpoint quantized on load (``int8``/``int4``), slice by slice."""

    def __init__(self, path: Path, precision: str):
        self.files = weight_files(path)
        self.readers: dict[Path, SliceReader] = {}
        self.precision = precision

    def _reader(self, name: str):
        file = self.files[name]
        if file not in self.readers:
            self.readers[file] = SliceReader(file)
        return self.readers[file]

    def has(self, name: str) -> bool:
        return name in self.files

    def dense(self, name: str, rows: list[Span] | None = None) -> torch.Tensor:
        reader = self._reader(name)
        t = reader.read(name) if rows is None else torch.cat([reader.read(name, 0, lo, hi) for lo, hi in rows])
        return t.float()

    def cols_of(self, name: str) -> int:
        return int(self._reader(name).header[name]["shape"][1])

    def format_of(self, name: str):
        return precision_format(self.precision, self.cols_of(name))

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        w = self.dense(name, rows)
        if cols is not None:
            w = w[:, cols[0]:cols[1]]
        qtype = self.format_of(name)  # chosen from the full row length, so every shard agrees
        w = w.numpy()
        return decode(encode(w, qtype), qtype, *w.shape)

    def close(self):
        for reader in self.readers.values():
            reader.close()


class Q4Source(GGUFSource):
    """A GGUF's matrices in formats wider than 4 bits (Q5_0, Q6_K, Q8_0, ...) re-encoded at load
    (the ``q4`` precision): dequantized exactly, then rounded to Q4_K (inputs a multiple of 256)
    or Q4_0. For a draft, whose weights move only acceptance, never the output: a level then
    streams fewer bytes. The token embedding, read a row at a time, keeps its own blocks.

    Re-encoding takes seconds (numpy), so each matrix's new blocks are kept on disk the first
    time (``reencoded_cache``: keyed by the file, its size and time, and the encoder's source) and
    read back at every later start."""

    def __init__(self, path: Path, config):
        super().__init__(path, config)
        self.cache = reencoded_cache(path)
        self._announced = False

    def _reencoded_blocks(self, name: str, qtype) -> np.ndarray:
        """The whole matrix ``name`` as ``qtype`` blocks [rows, bytes], from the cache or made now."""
        path = self.cache / f"{name}.{qtype.name}.npy"
        try:
            return np.load(path)
        except (OSError, ValueError):
            pass
        if not self._announced:
            self._announced = True
            print(f"[dovetail] re-encoding {self.index.path.name}'s matrices wider than 4 bits to 4 bits "
                  f"(once; kept in {self.cache})", file=sys.stderr, flush=True)
        blocks = encode(np.ascontiguousarray(self.dense(name).numpy()), qtype)
        try:
            self.cache.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
            with open(partial, "wb") as f:
                np.save(f, blocks)
            partial.replace(path)  # a concurrent start never reads half a file
        except OSError:  # a read-only cache: re-encode at every start
            pass
        return blocks

    def _reencoded(self, name: str):
        """The 4-bit format ``name`` is re-encoded to, or None where it keeps its own."""
        qtype = super().format_of(name)
        if qtype is None or SCHEMES[qtype].bits <= 4 or name == EMBED_NAME:
            return None
        return precision_format("int4", int(self._tensor(name).shape[0]))

    def format_of(self, name: str):
        return self._reencoded(name) or super().format_of(name)

    def decoded(self, name: str, rows: list[Span] | None, cols: Span | None) -> Decoded:
        qtype = self._reencoded(name)
        if qtype is None:
            return super().decoded(name, rows, cols)
        # blocks lie within a row and encode alone, so cutting the whole matrix's blocks equals
        # encoding the cut (columns: on the 4-bit format's super-blocks, which shard_ranges keeps)
        return decode_blocks(self._reencoded_blocks(name, qtype), qtype, int(self._tensor(name).shape[0]), rows, cols)


def reencoded_cache(gguf_path: Path) -> Path:
    """Where ``Q4Source`` keeps a file's re-encoded matrices: one folder per file version and
    encoder version (a changed file or encoder gets a new folder, never stale blocks)."""
    import hashlib

    from dovetail.kernels import packing
    from dovetail.store import dovetail_home

    stat = Path(gguf_path).stat()
    digest = hashlib.sha256(f"{Path(gguf_path).resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode()
                            + Path(packing.__file__).read_bytes()).hexdigest()[:16]
    return dovetail_home() / "reencoded" / f"{Path(gguf_path).parent.name}-{Path(gguf_path).stem}-{digest}"


def open_source(path: Path, precision: str, config):
    if precision == "native":
        return GGUFSource(gguf_file(path), config)
    if precision == "q4":
        return Q4Source(gguf_file(path), config)
    return FloatSource(path, precision)


# -- building the model ------------------------------------------------------------------------------
def balanced(total: int, unit: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s share of ``total`` items cut on multiples of ``unit`` (the first ranks get more)."""
    units = total // unit
    lo = rank * (units // world) + min(rank, units % world)
    hi = lo + units // world + (rank < units % world)
    return lo * unit, (hi * unit if rank < world - 1 else total)


def shard_ranges(config, source, rank: int, world: int) -> dict[str, list[Span]]:
    """This rank's spans of each split (``slices.shard_spans``), the MLP cut on block edges."""
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    for name, size in (("attention heads", config.num_attention_heads), ("KV heads", kv_heads),
                       ("vocabulary", config.vocab_size)):
        if size % world:
            raise UserError(f"cannot split this model into {world} shards: {name} ({size}) not divisible by {world}")
    unit = 1
    for i in range(config.num_hidden_layers):  # the MLP splits where every layer's down_proj has a block edge
        qtype = source.format_of(f"model.layers.{i}.mlp.down_proj.weight")
        if qtype is not None:
            unit = max(unit, SCHEMES[qtype].superblock)
    if config.intermediate_size < unit * world:
        raise UserError(f"cannot split an MLP of {config.intermediate_size} into {world} shards of whole "
                        f"{unit}-weight blocks")
    spans = shard_spans(config, rank, world, mlp=balanced(config.intermediate_size, unit, rank, world))
    q_cols = spans["q"][0][1] - spans["q"][0][0]
    for i in range(config.num_hidden_layers):  # o_proj's input columns split by heads: on block edges too?
        qtype = source.format_of(f"model.layers.{i}.self_attn.o_proj.weight")
        if qtype is not None and q_cols % SCHEMES[qtype].superblock:
            raise UserError(f"cannot split this model into {world} shards: each shard's attention output "
                            f"({q_cols} columns of o_proj, {qtype.name}) is not whole "
                            f"{SCHEMES[qtype].superblock}-weight blocks")
    return spans


def load_quantized(path: str | Path, precision: str, rank: int = 0, world: int = 1,
                   head_ids: np.ndarray | None = None) -> nn.Module:
    """The causal LM in ``path`` with quantized linears and embedding: all of it (``world=1``) or
    shard ``rank`` of ``world`` (tensor-parallel slices; the caller adds the collectives).
    ``head_ids``: keep only these rows of the LM head (a draft's cut head, ``draft_head.py``)."""
    if head_ids is not None and world > 1:
        raise ValueError("a cut head is for a draft model, which is never sharded")
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    source = open_source(path, precision, config)
    spans = shard_ranges(config, source, rank, world) if world > 1 else None
    with init_empty_weights(include_buffers=False):  # parameters on meta; rotary buffers real
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    arena = WeightArena()  # the packed weights on huge pages, freed with the model

    def quant_linear(weight_name: str, bias: torch.Tensor | None) -> nn.Module:
        rows, cols = split_of(weight_name, spans)
        if source.format_of(weight_name) is None:  # a float tensor inside a GGUF file: keep it dense
            from dovetail.models.fast_linear import FastLinear

            w = source.dense(weight_name, rows)
            if cols is not None:
                w = w[:, cols[0]:cols[1]].contiguous()
            dense = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
            dense.weight = nn.Parameter(w, requires_grad=False)
            if bias is not None:
                dense.bias = nn.Parameter(bias, requires_grad=False)
            return FastLinear(dense, "mm")
        return QuantLinear(pack(source.decoded(weight_name, rows, cols), arena), bias)

    for name, linear in linears:
        weight_name = f"{name}.weight"
        bias = None
        if linear.bias is not None:
            rows, _ = split_of(f"{name}.bias", spans)
            bias = source.dense(f"{name}.bias", rows)
            if rank > 0 and re.search(r"\.(o_proj|down_proj)$", name):
                bias = torch.zeros_like(bias)  # a row-parallel bias is added once, not once per shard
        if name == "lm_head" and (head_ids is not None or not source.has(weight_name)):
            continue  # a tied head shares the embedding's blocks; a cut one is made below
        module = quant_linear(weight_name, bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    table = quant_linear(EMBED_NAME, None)
    if not isinstance(table, QuantLinear):
        raise UserError(f"{path}: the token embedding is not in a quantized format")
    model.model.embed_tokens = QuantEmbedding(table, getattr(model.model.embed_tokens, "embed_scale", None))
    if head_ids is not None:
        from dovetail.models.draft_head import CutHead

        head_name = "lm_head.weight" if source.has("lm_head.weight") else EMBED_NAME
        if source.format_of(head_name) is None:
            raise UserError(f"{path}: a cut head needs a quantized LM head")
        model.lm_head = CutHead(QuantLinear(pack(source.decoded(head_name, None, None).take_rows_index(head_ids),
                                                 arena)), head_ids, config.vocab_size)
    elif not source.has("lm_head.weight"):
        model.lm_head = table
    for name, param in list(model.named_parameters()):  # norms (and anything else left on meta)
        if param.device.type != "meta":
            continue
        module_name, _, param_name = name.rpartition(".")
        rows, _ = split_of(name, spans)
        setattr(model.get_submodule(module_name), param_name, nn.Parameter(source.dense(name, rows), requires_grad=False))
    if isinstance(source, FloatSource):
        source.close()
    del source
    from dovetail.models.row_attention import use_row_attention

    use_row_attention(model)  # verification must reproduce plain decoding bit for bit (see there)
    return model.eval()

