"""The model families workbench runs itself, in plain PyTorch (one subpackage per family).

``llama4``: Llama 4 Scout / Maverick (text decoder with routed + shared experts, vision tower,
processor). Models of other families are recorded through adapters (``workbench.hooks.adapters``)
without being re-implemented here.
"""
