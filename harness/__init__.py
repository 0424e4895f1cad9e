"""awd-ablation: rigorous, reproducible dropout ablations of AWD-LSTM language models."""

__version__ = "0.1.0"
