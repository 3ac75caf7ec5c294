"""dve: reproduce data value embeddings (Wang et al., ICLR 2025) and check them against retraining."""

__version__ = "0.1.0"
