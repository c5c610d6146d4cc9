"""pml-dist: Pseudo Multi-Labels for single-positive multi-label learning at cluster scale."""

__version__ = "0.1.0"
