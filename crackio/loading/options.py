"""The loader's choices, in one light module (no torch): command lines build their `--help` from these."""

BACKENDS = ("auto", "dali", "torch")
OUTPUTS = ("float32", "uint8")  # normalized float images, or augmented uint8 ones normalized by the consumer
DEVICES = ("auto", "cpu", "cuda")
ORDERS = ("random", "block")  # reading order of training batches (crackio.loading.samplers.block_order)
