"""The product around the pieces: the torchrun worker, ``dpinfer serve`` and ``dpinfer demo``.

- ``worker.py``     the torchrun worker, the only entry point of a rank: device, threads,
                    start-up barrier, then it runs and supervises ``rank.main.run_rank``
- ``deployment.py`` a coordinator plus torchrun, started and stopped in order; shm cleanup
- ``commands.py``   ``dpinfer serve``
- ``demo.py``       ``dpinfer demo``
- ``options.py``    the engine options that ``serve`` and the worker share

Top layer: may import everything below it except ``testing``.
"""
