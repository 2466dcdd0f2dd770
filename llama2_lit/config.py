"""Model configuration: one dataclass, the paper's sizes and the course sizes.

The Llama 2 sizes follow Meta's ``params.json`` files and Table 1 of the paper.
The FFN hidden size is derived exactly as Meta's ``FeedForward.__init__`` derives it, so that a
preset reproduces the released checkpoints' shapes (and their exact parameter counts).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

IGNORE_INDEX = -100
"""Label of positions that carry no loss (``torch.nn.functional.cross_entropy``'s default)."""

DType = Literal["float32", "bfloat16", "float16"]
"""The floating-point types a command or strategy may name."""
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """Shape of a Llama 2 transformer.

    Field names follow Meta's ``ModelArgs`` / ``params.json`` (``dim``, ``n_layers``, ...), so a
    Meta ``params.json`` maps onto this class one to one.
    """

    name: str = "custom"
    """Preset name, for logs and run names."""
    dim: int = 4096
    """Model (residual stream) width."""
    n_layers: int = 32
    """Number of transformer blocks."""
    n_heads: int = 32
    """Number of query heads; head_dim = dim // n_heads."""
    n_kv_heads: int | None = None
    """Number of key/value heads (GQA, paper A.2.1). None means n_heads (plain multi-head attention)."""
    vocab_size: int = 32000
    """Tokenizer vocabulary size (Meta's params.json stores -1 and fills in tokenizer.n_words)."""
    multiple_of: int = 256
    """The FFN hidden size is rounded up to a multiple of this."""
    ffn_dim_multiplier: float | None = None
    """Optional widening of the FFN (1.3 for 70B, to keep GQA's parameter count equal to MHA's)."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon. Llama 2 uses 1e-5, as its params.json files say (Llama 1 used 1e-6)."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    max_seq_len: int = 4096
    """Context length: the RoPE tables and the default KV-cache size."""
    init_std: float = 0.02
    """Standard deviation of the from-scratch initialisation (see ``Transformer.reset_parameters``)."""
    unconfirmed: bool = False
    """True where the shape was never published (Llama 2 34B); see ``notes``."""
    notes: str = ""
    """Where the numbers come from."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        problems = []
        if self.dim % self.n_heads:
            problems.append(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        elif (self.dim // self.n_heads) % 2:
            problems.append(f"head_dim={self.dim // self.n_heads} must be even for RoPE")
        if self.vocab_size <= 0:
            problems.append(f"vocab_size={self.vocab_size} must be positive (fill in the tokenizer's size)")
        if problems:
            raise ValueError(f"invalid ModelConfig {self.name!r}: " + "; ".join(problems))

    # ----------------------------------------------------------------------------------- shapes
    @staticmethod
    def shape_fields() -> tuple[str, ...]:
        """The fields (and derived sizes) that determine the tensor shapes: two configs that agree on
        them hold the same tensors, so one's weights load into the other."""
        return ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim")

    def shape_differences(self, other: ModelConfig) -> list[str]:
        """The shape fields on which ``other`` differs (empty: the same tensors)."""
        return [f for f in self.shape_fields() if getattr(self, f) != getattr(other, f)]

    # ----------------------------------------------------------------------------------- derived
    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_rep(self) -> int:
        """How many query heads share one KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden size, computed exactly as Meta's ``FeedForward.__init__``.

        ``int(2 * 4d / 3)``, times ``ffn_dim_multiplier`` if set, rounded up to ``multiple_of``.
        7B: 16384 -> 10922 -> 11008; 70B: 32768 -> 21845 -> x1.3 = 28398 -> 28672.
        """
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_parameters(self, *, lm_head: bool = True, embeddings: bool = True) -> int:
        """Exact parameter count from the shapes (7B: 6,738,415,616)."""
        d, kv_dim = self.dim, self.n_kv_heads * self.head_dim
        attention = d * d + 2 * d * kv_dim + d * d  # wq, wk, wv, wo
        feed_forward = 3 * d * self.hidden_dim  # w1, w2, w3
        norms = 2 * d
        total = self.n_layers * (attention + feed_forward + norms) + d  # + final norm
        if embeddings:
            total += self.vocab_size * d
        if lm_head:
            total += self.vocab_size * d  # untied output projection
        return total

    def flops_per_token(self, seq_len: int, *, training: bool = True) -> float:
        """Model FLOPs per token, as in PaLM (appendix B) and nanoGPT's ``estimate_mfu``.

        Forward: 2 FLOPs per matmul parameter (embeddings are a lookup, not a matmul) plus the
        attention products ``QK^T`` and ``AV``, 2 * 2 * n_layers * seq_len * dim, counted dense
        as PaLM does (no halving for the causal mask). Training (forward + backward) is 3x forward:
        6N + 12 * n_layers * dim * seq_len.
        """
        n_matmul = self.num_parameters(embeddings=False)
        forward = 2 * n_matmul + 4 * self.n_layers * seq_len * self.dim
        return 3 * forward if training else forward

    # ----------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        """A preset by name (``llama2-7b``, ``nano``, ...), with optional field overrides."""
        if name not in PRESETS:
            raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


# Vocabulary of the toy-world tokenizer that the course sizes are built for (issue: 4k-8k tokens
# make the toy world's vocabulary meaningful).
COURSE_VOCAB_SIZE = 4096

PRESETS: dict[str, ModelConfig] = {
    # --- Llama 2 (paper Table 1; Meta params.json; HF config.json) ---
    "llama2-7b": ModelConfig(
        name="llama2-7b", dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, multiple_of=256,
        notes="Meta params.json; paper Table 1",
    ),
    "llama2-13b": ModelConfig(
        name="llama2-13b", dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, multiple_of=256,
        notes="Meta params.json; paper Table 1",
    ),
    "llama2-34b": ModelConfig(
        name="llama2-34b", dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, multiple_of=256,
        ffn_dim_multiplier=1.0, unconfirmed=True,
        notes="UNCONFIRMED: never released; shapes of Code Llama 34B (GQA per paper Table 1), rope_theta kept at 1e4",
    ),
    "llama2-70b": ModelConfig(
        name="llama2-70b", dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, multiple_of=4096,
        ffn_dim_multiplier=1.3, notes="Meta params.json; paper Table 1 (GQA, A.2.1)",
    ),
    # --- course sizes (toy world, CPU) ---
    "nano": ModelConfig(
        name="nano", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=COURSE_VOCAB_SIZE,
        multiple_of=32, max_seq_len=512, notes="tests: under 1M parameters, GQA",
    ),
    "micro": ModelConfig(
        name="micro", dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=COURSE_VOCAB_SIZE,
        multiple_of=64, max_seq_len=1024, notes="the demo: ~6.5M parameters, GQA",
    ),
    "mini": ModelConfig(
        name="mini", dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=COURSE_VOCAB_SIZE,
        multiple_of=128, max_seq_len=2048, notes="~28M parameters, GQA",
    ),
}
