"""Command-line prompt inpainting with a masked-diffusion LM (DAT spec §2.2 step 1, §5.4).

    python -m mixat_jax.inpaint --model DIR --response TEXT [--prompt_length 32] [--num_samples 1]
        [--steps S] [--temperature T] [--seed 0] [--answer_prefix "\\nAnswer: "] [--dtype D]

Prints the `num_samples` inpainted prompts, one per line, and nothing else on stdout (a prompt's
backslashes, newlines and carriage returns are written as \\\\, \\n and \\r). The sampler is the
Lüdke/AAPL one (`diffusion.inpaint.default_sampler`: steps = prompt length, T = 0, low-confidence
remasking, conditioning dropout, global remasking); `--steps` / `--temperature` override it.
Bad input: one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "LLaDA / Dream (masked-diffusion) HF model directory.")
flags.DEFINE_string("response", None, "The response the prompt is inpainted for.")
flags.DEFINE_integer("prompt_length", 32, "Number of [MASK] tokens to inpaint.")
flags.DEFINE_integer("num_samples", 1, "Prompts to sample.")
flags.DEFINE_integer("steps", None, "Denoising steps (default: prompt_length).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy (diversity from conditioning dropout).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("answer_prefix", "\nAnswer: ", "Text between the prompt and the response.")
flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).")


def escape_line(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def main(argv) -> int:
    del argv
    if not FLAGS.model or FLAGS.response is None:
        print("error: --model and --response are required", file=sys.stderr)
        return 2
    # lazy: the model stack loads only once flags are valid
    from mixat_jax.diffusion import inpaint as inpaint_lib
    from mixat_jax.hf import load as hf_load  # lazy: as above

    try:
        model, tokenizer = hf_load.load_pretrained(FLAGS.model, dtype=FLAGS.dtype, kind="diffusion")
        overrides = {"temperature": FLAGS.temperature}
        if FLAGS.steps is not None:
            overrides["steps"] = FLAGS.steps
        sampler = inpaint_lib.default_sampler(model.cfg, FLAGS.prompt_length, **overrides)
        (samples,) = inpaint_lib.inpaint_prompts(
            model,
            tokenizer,
            [FLAGS.response],
            prompt_length=FLAGS.prompt_length,
            num_samples=FLAGS.num_samples,
            sampler=sampler,
            seed=FLAGS.seed,
            answer_prefix=FLAGS.answer_prefix,
        )
    except ValueError as e:
        print("error: " + (" ".join(str(e).split()) or type(e).__name__), file=sys.stderr)
        return 2
    sys.stdout.write("".join(escape_line(s.prompt) + "\n" for s in samples))
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))))


if __name__ == "__main__":
    run()
