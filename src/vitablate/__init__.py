"""vitablate: ablations that ask why Vision Transformers work.

Three questions, one workflow (see README.md and docs/design.md):
architecture (do you even need attention?), pretext (what do self-supervised
ViTs learn?) and transfer (are attention patterns enough?).
"""

__version__ = "0.1.0"
