"""The text ends of a rank: the TokenizerProcess and the DetokenizerProcess (DESIGN.md §3).

- ``process.py``             TokenizerProcess: request bodies -> ``TokenizedRequest`` on the
                             ordered channel to the scheduler
- ``request_parsing.py``     decoding, validation and tokenization of one untrusted body
- ``images.py``              images -> pixel values, image tokens, content hash
- ``multimodal.py``          where each image goes in the prompt (``<image>`` marks)
- ``detokenizer_process.py`` DetokenizerProcess: token batches -> text deltas and finals
- ``incremental_detok.py``   UTF-8-safe incremental decoding, stop-string hold-back
- ``fast_decode.py``         exact table-driven decode for byte tokenizers
- ``output_builder.py``      scheduler outputs -> wire-ready ``OutputBody`` frames

May import: ``protocol``, ``transport``, ``runner`` (model and tokenizer loading only),
``config``, ``sampling``, ``log``, ``errors``. Never ``rank``, ``scheduler`` or above.
"""
