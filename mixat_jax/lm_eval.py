"""Utility through lm-evaluation-harness: ARC-Easy/Challenge, MMLU (issue #13; spec mixat.md
§8.2, dat.md §4.4 — the papers' 0-shot harness numbers).

    python -m mixat_jax.lm_eval --model DIR [--adapter DIR] --tasks arc_easy[,arc_challenge,mmlu]
        [--num_fewshot 0] [--limit N] [--batch_size B] [--output_path OUT]
        [--include_path DIR_OF_TASK_YAMLS] [--dtype float32|bfloat16] [--max_length 2048]

The harness runs its own task configs and metrics on `evaluation.harness.MixatLM` (the jitted
decoder + LoRA adapter). Writes OUT/results.json (the harness's results dict) and OUT/results.md
(its markdown table), and prints the table. Needs the optional lm-eval package
(``pip install 'lm-eval>=0.4.9'``); hub task datasets download on first use unless the
harness's cache has them (``--include_path`` adds local task YAMLs).
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from absl import app, flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory (or hub id, downloaded on request).")
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter directory.")
flags.DEFINE_string("tasks", None, "Comma-separated harness task names, e.g. arc_easy,mmlu.")
flags.DEFINE_integer("num_fewshot", 0, "Few-shot examples per prompt (the papers: 0).")
flags.DEFINE_integer("limit", None, "Evaluate only the first N documents of each task.")
flags.DEFINE_integer("batch_size", 8, "Sequences per jitted forward pass.")
flags.DEFINE_integer("max_length", 2048, "Longest scored sequence (left-truncated beyond).")
flags.DEFINE_string("output_path", None, "Directory for results.json and results.md.")
flags.DEFINE_string("include_path", None, "Directory of extra task YAMLs.")
flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).")
flags.DEFINE_integer("seed", 1234, "Harness random seed (few-shot sampling).")

INSTALL = "pip install 'lm-eval>=0.4.9'"


def import_harness():
    """The installed lm_eval package, or a one-line ValueError naming the install command."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError:
        raise ValueError(f"mixat_jax.lm_eval needs the lm-eval package; {INSTALL}") from None


def check_flags() -> list[str]:
    """The task names; a one-line ValueError on bad flags (before anything loads)."""
    if not FLAGS.model:
        raise ValueError("--model is required (HF model directory)")
    tasks = [t.strip() for t in (FLAGS.tasks or "").split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is required, e.g. --tasks arc_easy,arc_challenge,mmlu")
    if FLAGS.num_fewshot < 0:
        raise ValueError(f"--num_fewshot={FLAGS.num_fewshot} must be >= 0")
    if FLAGS.limit is not None and FLAGS.limit < 1:
        raise ValueError(f"--limit={FLAGS.limit} must be >= 1")
    if FLAGS.batch_size < 1:
        raise ValueError(f"--batch_size={FLAGS.batch_size} must be >= 1")
    if FLAGS.max_length < 2:
        raise ValueError(f"--max_length={FLAGS.max_length} must be >= 2")
    if FLAGS.include_path and not Path(FLAGS.include_path).is_dir():
        raise ValueError(f"--include_path {FLAGS.include_path!r} is not a directory")
    if FLAGS.output_path:
        cli_lib.check_output_dir(FLAGS.output_path, "--output_path")
    return tasks


def main(argv) -> int:
    del argv
    tasks = check_flags()
    import_harness()
    # lazy: jax, the model and the harness load only once flags are valid and lm-eval is present
    from lm_eval import utils

    # lazy: needs the optional lm-eval
    from mixat_jax.evaluation.harness import MixatLM, evaluate_tasks, task_manager

    manager = task_manager(tasks, FLAGS.include_path)
    lm = MixatLM(
        pretrained=FLAGS.model,
        adapter=FLAGS.adapter,
        dtype=FLAGS.dtype,
        batch_size=FLAGS.batch_size,
        max_length=FLAGS.max_length,
    )
    results = evaluate_tasks(
        lm, tasks, manager=manager, num_fewshot=FLAGS.num_fewshot, limit=FLAGS.limit,
        seed=FLAGS.seed,
    )  # fmt: skip
    results["config"]["model"] = "mixat_jax"
    results["config"]["model_args"] = {"model": FLAGS.model, "adapter": FLAGS.adapter}
    table = utils.make_table(results)
    if "groups" in results:
        table += "\n" + utils.make_table(results, "groups")
    text = json.dumps(results, indent=2, default=utils.handle_non_serializable)
    if FLAGS.output_path:
        out = Path(FLAGS.output_path)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(text + "\n")
        (out / "results.md").write_text(table)
        print(f"wrote {out / 'results.json'} and {out / 'results.md'}", file=sys.stderr)
    print(table)
    return 0


def run() -> None:
    app.run(
        lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))),
        flags_parser=lambda argv: cli_lib.parse_flags_one_line(FLAGS, argv),
    )


if __name__ == "__main__":
    run()
