"""DAT Stage B on CPU in about a minute (DAT spec §2.3): ``configs/tiny.py:cat`` (random tiny
model, synthetic safety world) with ``variant="dat"`` on Stage A's selected prompts.

    # Stage A on tiny random models (no downloads)
    python -m mixat_jax.dat_sample --config configs/dat/sample.py:tiny --workdir /tmp/dat_sample_tiny
    # Stage B: the CAT step on those prompts + the synthetic world's utility rows
    python -m mixat_jax.train --config configs/dat/tiny.py --workdir /tmp/dat_tiny \
        --config.dat.selected=/tmp/dat_sample_tiny/selected.jsonl

``config.dat.selected``: ``--config.dat.selected=FILE``, else ``$MIXAT_DAT_SELECTED``, else
``/tmp/dat_sample_tiny/selected.jsonl``. Refusals come from the synthetic world's row of each
record's original ``behavior`` (else ``data.refusal``). DAT's App. B loss/optimizer differences
are kept (utility weight 0.45, lr 1e-4); everything else is ``configs/tiny.py:cat`` (float32,
8 steps x 2 micro-batches of 1 adversarial pair + 3 utility rows). ``--config.dat.
include_original=true`` adds the world's own adversarial rows; ``--config.dat.
reselect_every_epoch=true`` re-selects from ``samples.jsonl`` each epoch (the ablation).
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs.tiny import get_config as tiny_config

SELECTED = os.environ.get("MIXAT_DAT_SELECTED", "/tmp/dat_sample_tiny/selected.jsonl")


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/dat/tiny.py takes no argument; got {arg!r}")
    c = tiny_config("cat")
    c.variant = "dat"
    c.discrete.pap_pool = ""
    c.optim.learning_rate = 1e-4
    c.loss.utility_weight = 0.45
    c.dat.selected = SELECTED
    return c
