"""What the fusion passes should raise in each zoo architecture (2 layers each), and why
they do not where they do not."""

from conftest import ROUNDTRIP_ARCHITECTURES

LAYERS = 2

ATTENTION_MISSES = {"deberta-v2": "attention probabilities"}
"""Architectures whose attention `fuse-attention` alone does not raise in the TorchScript
export, with the reason it reports: in DeBERTa-v2 the probabilities also feed shape
computations (Shape, Reshape), which only constant folding removes. The dynamo export and
the FX capture have no such reads, and the `fuse` pipeline (cleanup first) raises them all."""

GELU_LAYERS = {name: LAYERS for name in ROUNDTRIP_ARCHITECTURES if name not in ("opt", "llama", "mistral", "qwen2", "bloom")}
GELU_LAYERS["whisper-encoder"] = 4
"""GELU blocks per architecture (Whisper adds two in its convolutional stem). OPT uses ReLU,
the LLaMA family SiLU; BLOOM's own tanh-GELU form (x * (1 + 0.044715 * x * x)) is not matched yet."""

RMSNORMS = {"llama": 5, "mistral": 5, "qwen2": 5, "t5-encoder": 5}
"""Two per layer plus the final norm."""

SKIP_LAYERNORMS = {name: 2 * LAYERS for name in ROUNDTRIP_ARCHITECTURES}
SKIP_LAYERNORMS.update({"roberta": 5, "mpnet": 5, "opt": 1, "phi": 2})
"""Residual Add + norm pairs `fuse` folds into graphopt::SkipLayerNorm: two per layer. RoBERTa
and MPNet also fold the embedding sum before their first LayerNorm (its two terms have one
shape); OPT adds its MLP residual in a [batch*seq, hidden] view, so only the last residual
before the final norm has one shape on both sides; Phi's attention and MLP run in parallel
off one norm, so its residual sums feed only the next layer's norm (one per layer)."""

SKIP_LAYERNORM_DYNAMO_MISSES = {"gpt-neo": 1}
"""Fewer skip-norms in the dynamo export: GPT-Neo's attention output has length
`Min(128, seq)`, another symbol than the residual's `seq`, so one residual is left as is."""
