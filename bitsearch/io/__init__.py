"""Files: bit plans (:mod:`.plan`), bitsearch's packed checkpoints (:mod:`.checkpoint`) and
loading models and tokenizers (:mod:`.loading`)."""
