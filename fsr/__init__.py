"""fsr-export: VLM export with visual-token pruning inside the graphs."""
__version__ = "0.1.0"
