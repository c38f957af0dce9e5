"""Continuous batching: the SchedulerProcess and the in-process ``Scheduler`` (DESIGN.md §3).

- ``process.py``        SchedulerProcess: sockets, the idle sleeper, control signals, batches out
- ``scheduler.py``      ``Scheduler``: waiting -> extend -> decode -> finished; retraction; the
                        owner of the rank's lifecycle state
- ``admission.py``      token-budget admission and chunked prefill
- ``output_processor.py`` logits -> tokens, outputs and batch membership (a ``Scheduler`` mixin)
- ``parallel.py``       ``n`` completions of one prompt: one prefill, the others fork its KV
- ``schedule_batch.py`` ``ScheduleBatch``: one forward pass's tensors
- ``req.py``            ``Req``: one request's state
- ``kv_manager.py``     who owns which KV slot
- ``stop.py``           EOS / stop tokens / stop strings / length, O(1) per token
- ``validation.py``     internal invariants of a tokenized request
- ``metrics.py``        ``MetricsRecorder``: every request's counters and histograms -> ``RankMetrics``

Its inputs and outputs are the types of ``protocol.local``. May import: ``runner``,
``transport``, ``protocol``, ``config``, ``sampling``, ``log``, ``errors``.
"""
