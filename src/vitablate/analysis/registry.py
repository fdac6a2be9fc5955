"""The analysis-metric and evaluation registries.

METRICS: config-free names of the layer-wise analyses (`vitablate.jobs.analyse_encoder` writes one row per
layer, and per head where `per_head`; `representation.png` draws one panel per registered metric, in
registration order). Each entry's `input` says what the metric reads, at every depth of the encoder:

- "attention": a block's post-softmax map over patch tokens, (B, H, N, N), rows renormalised
  (`metrics.drop_prefix`), -> one value per head, shape (H,);
- "tokens": a block's output patch tokens, (B, N, C), -> one number;
- "probe": computed by the analysis job itself from per-layer features (the layer-wise linear probe).

`needs` lists the geometry keywords the function takes besides the tensor: "grid_size" (patch rows,
columns), "patch_size" (pixels). `higher` says what a larger value means (figure axis labels, docs).
This module imports no torch: functions are named "module:function" and imported on first use.

A new metric is one function (in `metrics.py` or anywhere) and one entry here:

    METRICS.register("my_metric", "vitablate.analysis.metrics:my_metric", input="tokens", needs=("grid_size",),
                     per_head=False, label="my metric (units)", higher="...")

EVALS: the evaluations of a pre-trained encoder (`pretext.evals`, the `eval` wildcard), in order; run by
`vitablate.jobs.evaluate_encoder`. `reads`: the `eval` settings it reads (the rest stay out of its job's params).
"""

from __future__ import annotations

from ..registry import Registry

METRICS: Registry = Registry("analysis metric", "the analysis job (vitablate.jobs.analyse_encoder)",
                             home="vitablate.analysis.registry", required_meta=("input",))

METRICS.register("attention_distance", "vitablate.analysis.metrics:attention_distance", input="attention",
                 needs=("grid_size", "patch_size"), per_head=True, label="attention distance (px)",
                 higher="more global attention")
METRICS.register("nmi", "vitablate.analysis.metrics:nmi", input="attention", needs=(), per_head=True,
                 label="NMI(query; key)", higher="queries attend more differently (less collapse)")
METRICS.register("token_cosine", "vitablate.analysis.metrics:token_cosine", input="tokens", needs=(),
                 per_head=False, label="token cosine similarity", higher="more similar (homogeneous) tokens")
METRICS.register("fourier_hf", "vitablate.analysis.metrics:fourier_hf", input="tokens", needs=("grid_size",),
                 per_head=False, label="Δ log amplitude (high − zero freq.)", higher="more high-frequency content")
METRICS.register("layer_probe_top1", None, input="probe", per_head=False, label="linear probe top-1 (%)",
                 higher="more linearly separable classes")


def computed_metrics(kind: str) -> tuple[str, ...]:
    """The registered metrics that read `kind` ("attention" or "tokens")."""
    return METRICS.names(lambda e: e.input == kind)


EVALS: Registry = Registry("evaluation", "pretext.evals", home="vitablate.analysis.registry")

# reads: the `eval` settings the evaluation reads (`vitablate.resolve.EVAL_READS`: only those are in its job's params)
EVALS.register("linear_probe", None, colour="#bcbd22", label="linear probe on frozen features", frozen=True,
               reads=("probe", "probe_weight_decay"))
EVALS.register("finetune", None, colour="#d62728", label="fine-tuning all weights", frozen=False, reads=())
EVALS.register("knn", None, colour="#8c564b", label="weighted k-NN on frozen features", frozen=True,
               reads=("knn_k", "knn_temperature"))
