"""Llama 4 in plain PyTorch: ``config`` (config.json), ``model`` (text decoder + early fusion),
``vision`` (vision tower + projector), ``processor`` (tokenizer + image tiling)."""
