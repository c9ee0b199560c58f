"""What the two deep stages (``models.encoder``, ``models.decoder``) share, split by role (checkpoint
directories, tokenizers and devices: :mod:`kernel.local_models`; process ranks: :mod:`kernel.dist`).

- :mod:`~models.deep.stage`: ``DeepStage``, the one template of both stages (``fit``, scoring, ``save``, ``load``).
- :mod:`~models.deep.params`: the shared ``DeepParams`` fields (both stages' ``Params`` extend it).
- :mod:`~models.deep.precision`: the one precision rule (bf16 / fp16 / fp32 for the device at hand).
- :mod:`~models.deep.quantization`: bitsandbytes 4/8-bit loading, LoRA, optimiser choice, dtype layout.
- :mod:`~models.deep.inputs`: battles -> model inputs and truncation records (one interface), training rows.
- :mod:`~models.deep.training`: the one soft-label loss, the one Trainer subclass, Trainer arguments, checkpoints.
- :mod:`~models.deep.batching`: length-sorted token-budgeted batches, rank shards and their gathering.
"""
