"""One model as the driver resolved it, the names that mark what a model folder holds, and the
precisions and fp32 linear kernels a model may run with (plain names: the configuration checks them).

The driver (``api.Dovetail``, the actor system) resolves a model once: its folder, the precision
it runs at (``auto`` decided), the folder its weights load from (the GGUF folder itself, or the
float conversion made for fp32 / int8 / int4), its EOS ids and its context. Every process (the
in-process engine, each target shard, the draft worker) receives this ``ModelSpec`` and loads from
it; nothing under ``models/`` resolves a name, converts a file or asks the model store again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GGUF_NAME = "model.gguf"  # the GGUF file in a model folder (a local file is linked under this name)
DRAFTER_SPEC_FILE = "drafter.json"  # what marks a folder as a Dovetail drafter (models/drafter_net.py)
PRECISIONS = ("auto", "native", "q4", "int8", "int4", "fp32")
QUANTIZED = ("native", "q4", "int8", "int4")
GGUF_PRECISIONS = ("native", "q4")  # run from a GGUF file's own blocks (q4: its wider ones re-encoded at load)
FLOAT_DEFAULT = {"target": "fp32", "draft": "int8"}  # what ``auto`` means for a float checkpoint
# ... and for a GGUF file: a target runs its own blocks; a draft, whose weights move only
# acceptance, its wider blocks re-encoded to 4 bits (a cheaper level, the same acceptance:
# docs/benchmarks.md, "The draft: a cut head")
GGUF_DEFAULT = {"target": "native", "draft": "q4"}
# N when a draft model's head is cut by default (``--draft-vocab auto``, models/draft_head.py):
# chosen by measuring draft cost against acceptance (docs/benchmarks.md, "The draft: a cut head").
# A vocabulary at most twice this is kept whole: the bytes saved would not pay for the tokens lost.
DEFAULT_CUT = 32768
LINEAR_KERNELS = ("stock", "mm", "mkldnn")  # an fp32 model's dense linears (models/fast_linear.py)


def is_drafter_dir(path: str | Path) -> bool:
    return (Path(path) / DRAFTER_SPEC_FILE).is_file()


@dataclass(frozen=True)
class ModelSpec:
    """A resolved model (plain fields: it crosses process boundaries)."""

    folder: str  # the model folder: a packaged or local GGUF view, or an HF folder
    precision: str  # native, int8, int4 or fp32: never auto
    weights: str  # where the weights load from: ``folder`` for native, else a float safetensors folder
    eos_token_ids: tuple[int, ...] = ()
    context_length: int = 1 << 30
    vocab_size: int = 0
    head_cut: str = ""  # a draft's cut LM head: the file of the token ids it keeps (models/draft_head.py)

    def __post_init__(self):
        if self.precision not in PRECISIONS[1:]:
            raise ValueError(f"a ModelSpec's precision must be resolved, got {self.precision!r}")

    @property
    def default_head_cut(self) -> int:
        """How many tokens ``--draft-vocab auto`` keeps of this draft model's head (0: all):
        ``DEFAULT_CUT`` for a quantized draft whose vocabulary is over twice that."""
        return DEFAULT_CUT if self.precision in QUANTIZED and self.vocab_size > 2 * DEFAULT_CUT else 0
