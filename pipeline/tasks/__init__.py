"""How each model is trained and evaluated: datasets, the trainer task, the config-to-model
adapter and the loader of a trained run (``models/`` holds the networks only)."""
