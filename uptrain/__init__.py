"""block-uptrain: convert Hugging Face causal LMs into Block Transformers and uptrain them.

Importing the package registers the Block Transformer with transformers' `AutoConfig` and
`AutoModelForCausalLM` (lazily, when transformers' Auto modules are loaded: see `auto_classes`), so that
`AutoModelForCausalLM.from_pretrained(folder)` needs no `trust_remote_code` in this process.
"""

from .auto_classes import install as _install_auto_classes

__version__ = "0.1.0"

_install_auto_classes()
