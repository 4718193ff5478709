"""The Dovetail draft model: a feature-level drafter with Dynamic Gating Fusion.

At position t it reads the target's last-layer feature f_t (after the final norm) and the
embedding of the next token x_{t+1}, and predicts the target's next feature f_{t+1}; the target's
frozen LM head turns a feature into next-token logits:

    e  = RMSNorm(Embed(x_{t+1}))
    h1 = f_t W1 ;  h2 = SiLU(e W2) ;  z = sigmoid([h1; h2] Wz)
    h  = z * h1 + (1 - z) * h2   -> N decoder layers of the target's own type
                                    (the first without input norm, no final norm) -> LM head

``fusion="fc"`` is EAGLE's plain ``h = [e; f] W`` (the ablation). With ``draft_vocab > 0`` the
head keeps only the training corpus's most frequent target tokens; logits are scattered back to
target ids, so callers always see the target's vocabulary.

Only the fusion and the decoder layers are trained and saved (``drafter.safetensors`` +
``drafter.json``); the embedding and LM head are read from the target folder at load time.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel

from dovetail.errors import UserError
from dovetail.models.spec import DRAFTER_SPEC_FILE, is_drafter_dir

FUSIONS = ("dgf", "fc")
INITS = ("random", "target")
SPEC_FILE, WEIGHTS_FILE, COUNTS_FILE = DRAFTER_SPEC_FILE, "drafter.safetensors", "token_counts.npy"


@dataclass(frozen=True)
class DrafterSpec:
    layers: int = 1
    fusion: str = "dgf"
    draft_vocab: int = 0  # 0: the target's full vocabulary; N: the corpus's N most frequent tokens
    init: str = "random"  # "target": the decoder layers start as copies of the target's last ones

    def __post_init__(self):
        if self.layers < 1:
            raise UserError(f"drafter layers must be >= 1, got {self.layers}")
        if self.fusion not in FUSIONS:
            raise UserError(f"fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.draft_vocab < 0:
            raise UserError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.init not in INITS:
            raise UserError(f"init must be one of {INITS}, got {self.init!r}")


@dataclass
class DrafterOutput:
    logits: torch.Tensor  # [batch, n, target vocab]
    hidden: torch.Tensor  # [batch, n, H]: the predicted next features


class FeatureDrafter(nn.Module):
    """DGF (or fc) fusion + N decoder layers + the target's frozen embedding and LM head."""

    def __init__(self, target_config, spec: DrafterSpec, embed_weight: torch.Tensor, head_weight: torch.Tensor,
                 vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.spec, self.target_config = spec, target_config
        hidden = target_config.hidden_size
        self.embed_norm = nn.RMSNorm(hidden, eps=getattr(target_config, "rms_norm_eps", 1e-6))
        if spec.fusion == "dgf":
            self.w1 = nn.Linear(hidden, hidden, bias=False)
            self.w2 = nn.Linear(hidden, hidden)
            self.wz = nn.Linear(2 * hidden, hidden)
        else:
            self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.body = AutoModel.from_config(_body_config(target_config, spec.layers), dtype=torch.float32)
        self.body.layers[0].input_layernorm = nn.Identity()
        self.body.norm = nn.Identity()
        # Frozen, shared with (or copied from) the target; not saved with the drafter.
        self.register_buffer("embed_weight", embed_weight, persistent=False)
        if vocab_ids is not None:
            vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
            head_weight = head_weight[vocab_ids].contiguous()
        self.register_buffer("head_weight", head_weight, persistent=False)
        self.register_buffer("vocab_ids", vocab_ids, persistent=False)
        self.int8_head = None  # set by quantize_int8()
        self.config = self.body.config  # what CachedLM reads (layers for its KV cache)
        self.config.vocab_size = target_config.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_norm.weight.dtype

    def fuse(self, features: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        e = self.embed_norm(F.embedding(token_ids, self.embed_weight))
        if self.spec.fusion == "fc":
            return self.fc(torch.cat([e, features], dim=-1))
        h1 = self.w1(features)
        h2 = F.silu(self.w2(e))
        z = torch.sigmoid(self.wz(torch.cat([h1, h2], dim=-1)))
        return z * h1 + (1 - z) * h2

    def predict_features(self, features, input_ids, position_ids=None, attention_mask=None, cache=None,
                         use_cache=False) -> torch.Tensor:
        """The predicted next features [batch, n, H] for (feature, next token) pairs."""
        h = self.fuse(features.to(self.dtype), input_ids)
        return self.body(inputs_embeds=h, position_ids=position_ids, attention_mask=attention_mask,
                         cache=cache, use_cache=use_cache).last_hidden_state

    def draft_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the draft vocabulary (the reduced one when there is one)."""
        if self.int8_head is not None and not self.training:
            return self.int8_head(hidden.float())
        return hidden @ self.head_weight.T

    def quantize_int8(self) -> "FeatureDrafter":
        """For CPU drafting: int8 dynamic linears for the fusion, the layers and a copy of the head
        (a draft step reads the whole head, so this cuts its bytes 4x). Inference only."""
        import warnings

        head = nn.Linear(self.head_weight.shape[1], self.head_weight.shape[0], bias=False)
        head.weight = nn.Parameter(self.head_weight, requires_grad=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.quantize_dynamic(self, {nn.Linear}, dtype=torch.qint8, inplace=True)
            self.int8_head = torch.ao.quantization.quantize_dynamic(
                nn.Sequential(head), {nn.Linear}, dtype=torch.qint8)[0]
        return self

    def target_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the target's vocabulary; ids outside a reduced vocabulary get -inf."""
        logits = self.draft_logits(hidden)
        if self.vocab_ids is None:
            return logits
        full = logits.new_full((*logits.shape[:-1], self.target_config.vocab_size), -float("inf"))
        return full.index_copy_(-1, self.vocab_ids, logits)

    def forward(self, input_ids, features, position_ids=None, attention_mask=None, cache=None, use_cache=False,
                logits_to_keep: int = 0) -> DrafterOutput:
        hidden = self.predict_features(features, input_ids, position_ids, attention_mask, cache, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        return DrafterOutput(self.target_logits(hidden), hidden)

    # -- files ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, meta: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.vocab_ids is not None:
            tensors["draft_vocab_ids"] = self.vocab_ids
        tmp = out / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(out / WEIGHTS_FILE)
        (out / SPEC_FILE).write_text(json.dumps({"spec": asdict(self.spec), **(meta or {})}, indent=1) + "\n")


def _body_config(target_config, layers: int):
    config = copy.deepcopy(target_config)
    config.num_hidden_layers = layers
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:layers])
    if hasattr(config, "max_window_layers"):
        config.max_window_layers = layers
    config.vocab_size = 1  # the body never embeds ids: it gets the fused features
    config.pad_token_id = None
    config.tie_word_embeddings = False
    config.initializer_range = 0.02  # the drafter's own init, whatever the target's config says
    return config


def read_target_tensors(target_dir: str | Path, names: list[str], files: dict | None = None) -> list[torch.Tensor]:
    """Named tensors of the target's checkpoint, fp32, read without loading the model (each
    safetensors file opened once; ``files``: its name -> file map, when the caller has it)."""
    from dovetail.models.slices import SliceReader, weight_files

    files = files or weight_files(Path(target_dir))
    tensors = {}
    for path in dict.fromkeys(files[name] for name in names):
        reader = SliceReader(path)
        try:
            for name in (n for n in names if files[n] == path):
                tensors[name] = reader.read(name).to(torch.float32)
        finally:
            reader.close()
    return [tensors[name] for name in names]


def frozen_target_tensors(target_dir: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's embedding and LM head (the embedding again when they are tied), fp32."""
    from dovetail.models.slices import weight_files

    config = AutoConfig.from_pretrained(target_dir)
    files = weight_files(Path(target_dir))
    names = ["model.embed_tokens.weight"]
    if "lm_head.weight" in files and not getattr(config, "tie_word_embeddings", False):
        names.append("lm_head.weight")
    tensors = read_target_tensors(target_dir, names, files)
    return tensors[0], tensors[-1]


def copy_target_layers(model: FeatureDrafter, target_dir: str | Path) -> None:
    """``init="target"``: start the drafter's N decoder layers as the target's last N (the first
    one's input norm excepted, which the drafter does not have)."""
    first = model.target_config.num_hidden_layers - model.spec.layers
    params = {k: v for k, v in model.body.state_dict().items() if k.startswith("layers.")}
    names = []
    for key in params:  # "layers.0.self_attn.q_proj.weight" -> "model.layers.{first}.self_attn.q_proj.weight"
        _, j, rest = key.split(".", 2)
        names.append(f"model.layers.{first + int(j)}.{rest}")
    with torch.no_grad():
        for param, tensor in zip(params.values(), read_target_tensors(target_dir, names)):
            param.copy_(tensor)


def shared_frozen_tensors(target_model) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding and LM head of a loaded HF target, shared (no copy) when they are dense."""
    embed = target_model.get_input_embeddings().weight
    head = target_model.get_output_embeddings().weight
    if head.layout != torch.strided or head.dtype != torch.float32:  # e.g. an mkldnn-converted head
        raise UserError("the target's LM head is not a dense fp32 tensor; use --target-kernel mm or stock")
    return embed.detach(), head.detach()


def read_spec(path: str | Path) -> tuple[DrafterSpec, dict]:
    meta = json.loads((Path(path) / SPEC_FILE).read_text())
    return DrafterSpec(**meta.pop("spec")), meta


def build_drafter(target_dir: str | Path, spec: DrafterSpec, vocab_ids=None, seed: int = 0,
                  frozen: tuple[torch.Tensor, torch.Tensor] | None = None) -> FeatureDrafter:
    """A freshly initialised drafter for the target whose float weights are in ``target_dir``
    (deterministic for a seed)."""
    config = AutoConfig.from_pretrained(target_dir)
    if frozen is None:
        frozen = frozen_target_tensors(target_dir)
    embed, head = frozen
    torch.manual_seed(seed)
    model = FeatureDrafter(config, spec, embed, head, vocab_ids)
    if spec.init == "target":
        copy_target_layers(model, target_dir)
    return model


def load_drafter(drafter_dir: str | Path, target_dir: str | Path,
                 frozen: tuple[torch.Tensor, torch.Tensor] | None = None, draft_vocab: int = 0,
                 precision: str = "fp32") -> FeatureDrafter:
    """Load a trained drafter; its embedding and head come from the target it was trained for,
    whose float weights are in ``target_dir``.

    ``draft_vocab``: keep only the N most frequent tokens of its training corpus in the head (the
    head is the target's frozen one, so a drafter trained on the full vocabulary can be cut at load
    time); ``precision="int8"``: see ``FeatureDrafter.quantize_int8``."""
    from safetensors.torch import load_file

    drafter_dir = Path(drafter_dir)
    if not is_drafter_dir(drafter_dir):
        raise UserError(f"{drafter_dir} is not a Dovetail drafter folder (no {SPEC_FILE})")
    spec, meta = read_spec(drafter_dir)
    config = AutoConfig.from_pretrained(target_dir)
    if meta.get("hidden_size", config.hidden_size) != config.hidden_size:
        raise UserError(f"drafter {drafter_dir} was trained for hidden size {meta['hidden_size']}, "
                        f"target has {config.hidden_size}")
    tensors = load_file(str(drafter_dir / WEIGHTS_FILE))
    vocab_ids = tensors.pop("draft_vocab_ids", None)
    if draft_vocab and (vocab_ids is None or draft_vocab < len(vocab_ids)):
        vocab_ids = frequent_ids(drafter_dir, draft_vocab, vocab_ids)
    if frozen is None:
        frozen = frozen_target_tensors(target_dir)
    embed, head = frozen
    model = FeatureDrafter(config, spec, embed, head, vocab_ids)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise UserError(f"drafter {drafter_dir} does not match its spec (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})")
    model = model.eval().requires_grad_(False)
    # any precision but fp32 means the drafter's own int8 (its GGUF-free weights have no native form)
    return model if precision == "fp32" else model.quantize_int8()


def frequent_ids(drafter_dir: Path, size: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """The ``size`` most frequent target ids of the drafter's corpus (``token_counts.npy``), plus
    its EOS ids, restricted to ``within`` when given."""
    import numpy as np

    counts_file = Path(drafter_dir) / COUNTS_FILE
    if not counts_file.exists():
        raise UserError(f"{drafter_dir} has no {COUNTS_FILE}: it cannot be cut to a smaller draft vocabulary")
    counts = np.load(counts_file).astype(np.int64)
    if within is not None:
        mask = np.zeros_like(counts, dtype=bool)
        mask[within.numpy()] = True
        counts = np.where(mask, counts, -1)
    always = json.loads((Path(drafter_dir) / SPEC_FILE).read_text()).get("eos_token_ids", [])
    return torch.from_numpy(top_ids(counts, size, always))


def top_ids(counts, size: int, always=()):
    """``always`` then the ids with the highest ``counts`` (entries < 0 never chosen), ``size`` in
    all, sorted ascending (int64 numpy)."""
    import numpy as np

    order = [int(t) for t in np.argsort(-counts, kind="stable") if counts[t] >= 0]
    ids = list(dict.fromkeys([int(t) for t in always] + order))[:size]
    return np.sort(np.asarray(ids, dtype=np.int64))
