"""Attack CLI: GCG (spec mixat.md §6.4) or the continuous embedding attack (§5) on one model.

    python -m mixat_jax.attack --config configs/attack/gcg.py[:nanogcg|harmbench|mixat_train] \
        --config.model=DIR [--config.adapter=DIR] --config.behavior=TEXT --config.target=TEXT \
        [--config.num_steps=N --config.search_width=W --config.topk=K --config.seed=S] --workdir OUT
    python -m mixat_jax.attack --config configs/attack/gcg.py --config.model=DIR \
        --config.behaviors=FILE.csv --config.targets=FILE.json [--config.limit=N] --workdir OUT
    python -m mixat_jax.attack --config configs/attack/continuous.py --config.model=DIR \
        --config.behavior=TEXT --config.target=TEXT --workdir OUT
    ... [--compilation_cache_dir DIR]   (any of the above: JAX's persistent compilation cache)

Single behaviour: ``OUT/result.json`` (best_loss, best_string, losses per step, num_steps,
seconds_per_step = median after the first step, compile_seconds, ...). Behaviour file (HarmBench
CSV + targets JSON): ``OUT/results.jsonl``, one line per behaviour, resumable (ids already there
are skipped). Always ``OUT/config.json`` and the loss plot ``OUT/losses.png``; a progress line per
step on stderr. Bad input: one line on stderr, exit status 2.

``--compilation_cache_dir DIR``: JAX's persistent compilation cache (as train's
``--config.compilation_cache_dir``; every compile is stored, whatever its duration), so a later
process with the same model shapes and config loads the GCG step instead of compiling it
(issue #14, time to loss). ``""`` (default) = off.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Attack config file (configs/attack/*.py).")
flags.DEFINE_string("workdir", None, "Output directory (created; file mode resumes from it).")
flags.DEFINE_string(
    "compilation_cache_dir", "", "JAX persistent compilation cache directory ('' = off)."
)


def enable_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache at ``path`` for every compile of this process
    (no minimum compile time or entry size, so the GCG step and its helpers are all stored)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv) -> int:
    del argv
    if FLAGS.config is None or not FLAGS.workdir:
        raise ValueError("--config and --workdir are required")
    cli_lib.check_output_dir(FLAGS.workdir)
    if FLAGS.compilation_cache_dir:
        enable_compilation_cache(FLAGS.compilation_cache_dir)
    # lazy: the pipeline loads only once flags are valid
    from mixat_jax.attacks.attack_run import run

    run(FLAGS.config, FLAGS.workdir)
    return 0


def cli() -> None:
    app.run(lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))))


if __name__ == "__main__":
    cli()
