"""loom: an ambient service mesh (shared package: contracts, model, identity, HBONE, loomctl, lab)."""

__version__ = "0.1.0"
