"""DAT Stage A: sample, score and select adversarial prompts with a masked-diffusion LM (DAT spec
§2.2, §2.5).

    python -m mixat_jax.dat_sample --config configs/dat/sample.py[:tiny] --workdir OUT \
        [--config.limit=N] [--config.num_samples=N] [--config.num_selected=K] \
        [--config.judge_model=DIR] [--config.mesh.data=D] [--config.x.y=...]

Writes ``OUT/config.json``, per-process shards ``OUT/shards/process_*.jsonl`` while running,
then ``OUT/samples.jsonl`` (every candidate), ``OUT/selected.jsonl`` (K per behaviour, what
``variant="dat"`` training reads), ``OUT/summary.json`` and ``OUT/summary.png``. Re-running the
same command continues an interrupted run and is a no-op on a finished one; a workdir holding
another config is refused. SIGTERM exits 143 and Ctrl-C 130 after the unit in progress is
written; bad input prints one ``error: ...`` line and exits 2 with nothing written into OUT.
With ``MIXAT_JAX_DISTRIBUTED=1`` (``launch/``) ``jax.distributed.initialize()`` runs first
(``MIXAT_JAX_COORDINATOR`` / ``MIXAT_JAX_NUM_PROCESSES`` / ``MIXAT_JAX_PROCESS_ID`` pass its
arguments explicitly; CPU processes use gloo): every process runs its share of the work units
on its own devices and process 0 merges the shards.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Stage A config file (configs/dat/sample.py[:tiny])."
)
flags.DEFINE_string("workdir", None, "Output directory (created; re-runs resume from it).")


def main(argv) -> int:
    del argv
    try:
        config = FLAGS.config
        if config is not None:
            config.to_dict()  # config_flags loads the file lazily; surface its errors here
    except OSError as e:
        raise ValueError(f"cannot load --config: {cli_lib.last_line(e)}") from None
    if config is None:
        raise ValueError("--config is required")
    if not FLAGS.workdir:
        raise ValueError("--workdir is required")
    # lazy: the pipeline (jax, models) loads only once flags are valid
    from mixat_jax.dat import sample_config

    cfg = sample_config.from_config_dict(config)
    cli_lib.check_output_dir(FLAGS.workdir)
    if FLAGS.verbosity == 0:
        logging.set_verbosity(logging.WARNING)
    import jax

    if os.environ.get("MIXAT_JAX_DISTRIBUTED") == "1":
        cli_lib.initialize_distributed(jax)
    # lazy: as above
    from mixat_jax.dat import stage_a

    stage_a.run(cfg, FLAGS.workdir)
    return 0


def cli() -> None:
    app.run(
        lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))),
        flags_parser=lambda argv: cli_lib.parse_flags_one_line(FLAGS, argv),
    )


if __name__ == "__main__":
    cli()
