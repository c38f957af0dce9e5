"""The model on its KV pool, in the SchedulerProcess (DESIGN.md §3).

- ``model_runner.py``   ``ModelRunner``: flattened extend/decode batches on transformers model code
- ``attention.py``      the registered attention function that reads and writes the pool
- ``kv_pool.py``        the paged KV pool and the request -> slot table
- ``radix_cache.py``    the radix tree over cached prefixes (LRU, locks, image-hash namespaces)
- ``sampler.py``        greedy / temperature / top-k / top-p with per-request generators
- ``vision.py``         LLaVA image features injected into the input embeddings
- ``registry.py``       the model registry: built-in names and local directories
- ``builtin_models.py`` atomic, fingerprinted builds of the built-in models

May import: ``config``, ``sampling``, ``log``, ``errors`` (and torch, transformers). Never
``scheduler`` or above, never ``protocol``: it knows tensors, not messages.
"""
