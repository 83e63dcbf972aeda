"""Data: tokenizers, the prepare CLI (text -> ArrayRecord shards + manifest), the built-in corpus, the grain loader.

The flow runs one way: `tokenizer` -> `prepare` -> `pipeline` (sources, mixture, packing, batches). A batch is a dict
of numpy arrays `tokens`, `targets`, `loss_weights`, `segment_ids`, `positions`, each (rows, seq_len).
Submodules are imported on demand so that `import dsjax.data` stays cheap.
"""
