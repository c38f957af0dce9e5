"""torchrun entry point for dpinfer engine ranks.

    torchrun --nproc_per_node=N launch/engine.py --coordinator tcp://HOST:PORT --model M [engine options]

Each worker reads RANK / LOCAL_RANK / WORLD_SIZE, picks cuda:LOCAL_RANK (or cpu), meets the
others at a start-up barrier, then runs and supervises its rank stack (see
``dpinfer.launcher.worker``). ``--help`` lists every engine option.
"""

from dpinfer.launcher.worker import main

if __name__ == "__main__":
    main()
