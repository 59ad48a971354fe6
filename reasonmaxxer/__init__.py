"""reasonmaxxer: RL-free reasoning post-training by sparse policy selection at high-entropy forks.

See README.md and the method spec. The library is a set of small modules, one per concept:
models, data, prompts, sampling, verify, store, evaluate, scoring, gating, losses, train, cli.
"""

__version__ = "0.1.0"
