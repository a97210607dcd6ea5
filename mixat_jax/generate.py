"""Command-line generation: prints only the completion to stdout.

    python -m mixat_jax.generate --model DIR|FILE.gguf [--adapter DIR] --prompt TEXT [--chat|--no-chat]
        [--max_new_tokens N] [--temperature T] [--top_p P] [--seed S] [--dtype float32|bfloat16]

`--chat` (default) renders the prompt as a user turn with the model's chat template and stops at
the end-of-turn token; `--no-chat` continues the raw text.
"""

from __future__ import annotations

import sys

from absl import app, flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "model", None, "HF model directory, llama.cpp .gguf file, or hub id (downloaded on request)."
)
flags.DEFINE_string("adapter", None, "PEFT LoRA adapter directory.")
flags.DEFINE_string("prompt", None, "Prompt text.")
flags.DEFINE_boolean("chat", True, "Render the prompt with the chat template.")
flags.DEFINE_integer("max_new_tokens", 128, "Maximum number of new tokens.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("dtype", None, "Parameter dtype (default: the checkpoint's).")


def main(argv) -> int:
    del argv
    if not FLAGS.model or FLAGS.prompt is None:
        print("error: --model and --prompt are required", file=sys.stderr)
        return 2
    # lazy: the pipeline loads only once flags are valid
    from mixat_jax.sampling import TextGenerator

    try:
        gen = TextGenerator.from_pretrained(
            FLAGS.model, adapter=FLAGS.adapter, dtype=FLAGS.dtype, batch_size=1
        )
        (text,) = gen.generate(
            [FLAGS.prompt],
            max_new_tokens=FLAGS.max_new_tokens,
            temperature=FLAGS.temperature,
            top_p=FLAGS.top_p,
            seed=FLAGS.seed,
            chat=FLAGS.chat,
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text + "\n")
    return 0


def run() -> None:
    # the documented spelling is --no-chat; absl spells negated booleans --nochat
    sys.argv = ["--nochat" if a == "--no-chat" else a for a in sys.argv]
    app.run(lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))))


if __name__ == "__main__":
    run()
