"""MixAT / CAT / discrete-only / SFT adversarial training of a chat LLM with LoRA (spec §3, §10).

    python -m mixat_jax.train --config configs/<name>.py[:arg] --workdir OUT \
        [--config.steps=N] [--config.seed=S] [--config.checkpoint_every=K] \
        [--config.mesh.data=D --config.mesh.fsdp=F --config.mesh.tensor=T] [--config.x.y=...]

Writes ``OUT/config.json``, ``OUT/metrics.jsonl`` (one record per optimizer step),
TensorBoard events in ``OUT/tb``, orbax checkpoints in ``OUT/checkpoints`` and, at the end,
the PEFT adapter in ``OUT/adapter``. ``OUT`` may be a ``gs://`` URL (all of it is written there
through ``mixat_jax.storage``; needs ``pip install 'etils[epath-gcs]'``). ``configs/demo.py`` runs the embedded demo instead
(measure → MixAT → measure; ``--workdir`` defaults to ``runs/demo``), ``configs/dat_demo.py``
the embedded DAT demo (Stage A → DAT and CAT → measure; ``demo.kind="dat"``). Re-running the same command resumes from the newest
checkpoint. SIGTERM saves a checkpoint and exits with status 143, Ctrl-C (SIGINT) likewise with
130 (a second Ctrl-C stops at once; the last periodic checkpoint stays intact); bad input, an
unusable ``--workdir`` included, prints one line on stderr and exits with status 2 (nothing in OUT
is modified). With ``MIXAT_JAX_DISTRIBUTED=1``
(set by ``launch/``) ``jax.distributed.initialize()`` runs before any device is touched;
``MIXAT_JAX_COORDINATOR`` / ``MIXAT_JAX_NUM_PROCESSES`` / ``MIXAT_JAX_PROCESS_ID`` pass its
arguments explicitly (local multi-process runs; CPU processes use gloo collectives).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py[:arg]).")
flags.DEFINE_string("workdir", None, "Run directory (created; re-runs resume from it).")

EXIT_BAD_INPUT = cli_lib.EXIT_BAD_INPUT
EXIT_STATUS = {"preempted": cli_lib.EXIT_PREEMPTED, "interrupted": cli_lib.EXIT_INTERRUPTED}


def main(argv) -> int:
    del argv
    try:
        config = FLAGS.config
        if config is not None:
            config.to_dict()  # config_flags loads the file lazily; surface its errors here
    except OSError as e:  # the config file failed to load (reported lazily by config_flags)
        raise ValueError(f"cannot load --config: {cli_lib.last_line(e)}") from None
    if config is None:
        raise ValueError("--config is required")
    is_demo = "demo" in config
    workdir = FLAGS.workdir or (config.demo.workdir if is_demo else None)
    if not workdir:
        raise ValueError("--workdir is required")
    cli_lib.check_output_dir(workdir, allow_url=not is_demo)  # a gs:// workdir: training only
    if FLAGS.verbosity == 0:  # orbax/absl INFO chatter off unless -v is given
        logging.set_verbosity(logging.WARNING)
    import jax

    if os.environ.get("MIXAT_JAX_DISTRIBUTED") == "1":
        cli_lib.initialize_distributed(jax)
    if is_demo and config.demo.get("kind", "mixat") == "dat":
        # configs/dat_demo.py: Stage A, DAT/CAT training, measure (mixat_jax/demo/dat_run.py)
        # lazy: the pipeline loads only once flags are valid
        from mixat_jax.demo.dat_run import run_dat_demo

        run_dat_demo(config, workdir)
        return 0
    if is_demo and config.demo.get("kind", "mixat") == "real":
        # configs/real/*.py: a pretrained model measured, MixAT-trained, measured (demo/real_run.py)
        # lazy: the pipeline loads only once flags are valid
        from mixat_jax.demo.real_run import run_real

        run_real(config, workdir)
        return 0
    if is_demo:  # configs/demo.py: measure, train, measure (mixat_jax/demo/run.py)
        # lazy: the pipeline loads only once flags are valid
        from mixat_jax.demo.run import run_demo

        run_demo(config, workdir)
        return 0
    # lazy: the pipeline loads only once flags are valid
    from mixat_jax.training.loop import run

    reselect = None
    if "dat" in config and config.dat.get("reselect_every_epoch", False):
        # lazy: DAT's re-selection hook (layer 3 dat/, which training/ must not import)
        from mixat_jax.dat.reselect import epoch_rows as reselect

    status = run(config, workdir, reselect=reselect)
    return EXIT_STATUS.get(status, 0)


def cli() -> None:
    app.run(
        lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))),
        flags_parser=lambda argv: cli_lib.parse_flags_one_line(FLAGS, argv),
    )


if __name__ == "__main__":
    cli()
