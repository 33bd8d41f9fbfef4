"""alice-ds: Alice self-supervised pretraining of 3D transformers on CT, hosted in DeepSpeed.

The package tree is the architecture: `models` (pure nn.Modules), `losses` (loss math and its
reference), `kernels` (Triton), `data` (IO, preprocessing, phantoms, pair sampler), `sam`
(anatomical embeddings), `engine` (everything DeepSpeed). See README.md and docs/interfaces.md.
"""

__version__ = "0.1.0"


def load_pretrained(model, path, **kwargs):
    """Load exported alice-ds weights into a MONAI `SwinUNETR`; see `alice_ds.export.load_pretrained`."""
    from alice_ds.export import load_pretrained as _load_pretrained

    return _load_pretrained(model, path, **kwargs)
