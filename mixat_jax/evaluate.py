"""Robustness + utility evaluation of a chat model (spec mixat.md §8, dat.md §4).

    python -m mixat_jax.evaluate --config configs/eval/<suite>.py --config.model=DIR \
        [--config.adapter=DIR] [--config.behaviors=CSV] [--config.limit=N] \
        [--config.judge=refusal|harmbench|strongreject|keyword --config.judge_model=DIR] \
        [--config.xstest=CSV|xstest_v2] [--config.harmless=TXT|mixat] \
        [--config.utility_judge.kind=string|model --config.utility_judge.model=DIR] \
        [--config.lm_eval.tasks=arc_easy,arc_challenge,mmlu [--config.lm_eval.include_path=DIR]] \
        [--config.mc=FILE_or_dataset_id] --workdir OUT

Suites: `tiny.py` (every attack with tiny budgets, built-in behaviours, helpers = the target),
`mixat.py` (MixAT: 40 HarmBench behaviours × 7 attacks, HarmBench classifier, 512 tokens;
XSTest in three classes and HarmLess, judged by `utility_judge.model`),
`dat.py` (DAT: JBB behaviours, past tense, translation, GCG, PAIR, sampled direct requests,
StrongREJECT), `xstest.py` (utility only). Outputs and caches are described in
`mixat_jax.evaluation.pipeline`; a re-run with the same command resumes. Bad input: one line
on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Evaluation suite config file (configs/eval/*.py).")
flags.DEFINE_string("workdir", None, "Output directory (created; re-runs resume from it).")


def main(argv) -> int:
    del argv
    if FLAGS.config is None:
        raise ValueError("--config is required (e.g. configs/eval/tiny.py)")
    if FLAGS.workdir:
        cli_lib.check_output_dir(FLAGS.workdir)
    # lazy: the pipeline loads only once flags are valid
    from mixat_jax.evaluation.pipeline import run

    run(FLAGS.config, FLAGS.workdir or "")
    return 0


def cli() -> None:
    app.run(lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))))


if __name__ == "__main__":
    cli()
