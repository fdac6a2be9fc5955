"""The pretext registry: config name -> `PretextObjective` class, plus its family, colour and loss label.

Registration order is the pretexts' order in the summary and the figures. Families: "supervised", "CL"
(contrastive), "MIM" (masked image modelling), "hybrid" (a mix of the others: `ingredients` names them);
the summary's CL-against-MIM comparisons take every registered pretext of those two families. This module
imports no torch (the Snakemake parse and the reports read it): classes are named "module:Class" and
imported on first use.

A new pretext is one `PretextObjective` subclass (in `pretext.py` or anywhere) and one entry here:

    PRETEXTS.register("my_mim", "vitablate.objectives.pretext:MyMIM", family="MIM", colour="#e377c2",
                      loss_label="L2, masked patches")

Its constructor takes `(encoder, mean, std, **kwargs)`, kwargs from `PretextConfig.objective_kwargs()`
(add its settings there and to config/schema.yaml's enums: tests/test_registry.py checks they agree).
"""

from __future__ import annotations

from ..registry import Registry

FAMILIES = ("supervised", "CL", "MIM", "hybrid")

PRETEXTS: Registry = Registry("pretext", "pretext.pretexts", home="vitablate.objectives.registry",
                              required_meta=("family",))

PRETEXTS.register("supervised", "vitablate.objectives.pretext:Supervised", family="supervised", colour="#444444",
                  loss_label="cross-entropy (nats)", labelled=True)
PRETEXTS.register("moco", "vitablate.objectives.pretext:MoCo", family="CL", colour="#d62728",
                  loss_label="InfoNCE × 2τ, symmetric")
PRETEXTS.register("simmim", "vitablate.objectives.pretext:SimMIM", family="MIM", colour="#1f77b4",
                  loss_label="L1, masked pixels")
PRETEXTS.register("mae", "vitablate.objectives.pretext:MAE", family="MIM", colour="#17becf",
                  loss_label="MSE, masked patches (norm. pixels)")
PRETEXTS.register("hybrid", "vitablate.objectives.pretext:Hybrid", family="hybrid", colour="#9467bd",
                  loss_label="λ·MoCo + (1−λ)·SimMIM", ingredients=("moco", "simmim"))


def pretext_base(pretext_id: str) -> str:
    """The registered name of a grid pretext id: 'hybrid_0.2' -> 'hybrid' (a lambda suffix dropped)."""
    if pretext_id in PRETEXTS:
        return pretext_id
    head, _, tail = pretext_id.rpartition("_")
    try:
        float(tail)
    except ValueError:
        return pretext_id
    return head if head else pretext_id


def family(pretext_id: str) -> str | None:
    """The family of a grid pretext id ('CL', 'MIM', 'supervised', 'hybrid'); None if not registered."""
    base = pretext_base(pretext_id)
    return PRETEXTS.entry(base).family if base in PRETEXTS else None


def family_names(name: str) -> tuple[str, ...]:
    """The registered pretexts of a family, in order."""
    return PRETEXTS.names(lambda e: e.family == name)
