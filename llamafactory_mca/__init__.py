"""llamafactory-mca: a Megatron-core training backend for LLaMA-Factory.

Importing this package must stay cheap: the activation .pth imports `llamafactory_mca._activate` in every
Python process, so nothing heavy (torch, megatron, llamafactory) may be imported here.
"""

__version__ = "0.1.0"
