"""block-uptrain: convert Hugging Face causal LMs into Block Transformers and uptrain them."""

__version__ = "0.1.0"
