"""Command-line GGUF -> Hugging Face conversion (issue #12, "GGUF in").

    python -m mixat_jax.convert --gguf FILE.gguf --out DIR [--dtype float32|bfloat16]

Writes DIR as a Hugging Face checkpoint directory that transformers
(`AutoModelForCausalLM.from_pretrained(DIR)`), nanoGCG and mixat_jax load: `model.safetensors`
(sharded with an index above 2 GiB) holding the dequantized tensors under HF names (llama.cpp's
Q/K row permutation undone, `hf.gguf`), `config.json` (from the GGUF metadata),
`generation_config.json` (bos / eos / pad ids), and the tokenizer transformers builds from the
metadata with the file's chat template (`tokenizer.json`, `tokenizer_config.json`,
`chat_template.jinja`). Nothing runs through JAX. The directory is written under a temporary name
beside DIR and renamed at the end, so DIR never exists half-written. Bad input: one `error: ...`
line on stderr, exit status 2.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from mixat_jax import cli as cli_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("gguf", None, "llama.cpp GGUF file (llama or qwen2 architecture).")
flags.DEFINE_string("out", None, "Output Hugging Face directory (must not exist or be empty).")
flags.DEFINE_string("dtype", "float32", "Tensor dtype written: float32 (exact) or bfloat16.")

SHARD_BYTES = 2 << 30


def expected_names(cfg) -> set[str]:
    """The HF tensor names a checkpoint of `cfg` holds (the decoder's parameters, no more)."""
    from mixat_jax.hf import keys  # lazy: model modules load only once flags are valid

    biased = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias}
    biased.update(
        {"o_proj": cfg.o_bias, **dict.fromkeys(("gate_proj", "up_proj", "down_proj"), cfg.mlp_bias)}
    )
    names = set()
    for rule in keys.rules_for(cfg.model_type):
        if rule.path == ("lm_head",) and cfg.tie_word_embeddings:
            continue
        if rule.path[-1] == "bias" and not biased[rule.path[1]]:
            continue
        layers = range(cfg.num_layers) if rule.stacked else [None]
        names.update(keys.hf_name(rule, i) for i in layers)
    return names


def write_hf_dir(gguf_path: str, out: Path, dtype: str) -> Path:
    """Converts `gguf_path` into the HF directory `out` (temp dir + rename); returns `out`."""
    import ml_dtypes
    import numpy as np

    from mixat_jax import tokenizer_build  # lazy: transformers loads only once flags are valid
    from mixat_jax.hf import gguf as gguf_io  # lazy: as above (gguf, numpy)
    from mixat_jax.hf.safetensors_io import save_file  # lazy: as above
    from mixat_jax.models.config import ModelConfig  # lazy: as above

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype {dtype!r} is not supported; use float32 or bfloat16")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"--out {str(out)!r} already exists and is not empty; pass a new directory"
        )
    cli_lib.check_output_dir(out, "--out")
    ckpt = gguf_io.GGUFCheckpoint(gguf_path)
    cfg = ModelConfig.from_hf(ckpt.hf_config, dtype=dtype)
    want, have = expected_names(cfg), set(ckpt)
    if want != have:
        missing, extra = sorted(want - have), sorted(have - want)
        raise ValueError(
            f"{gguf_path}: tensors do not match the GGUF metadata"
            + (f"; missing {', '.join(missing[:8])}" if missing else "")
            + (f"; unexpected {', '.join(extra[:8])}" if extra else "")
        )
    tokenizer = gguf_io.load_tokenizer(gguf_path, ckpt.metadata.get("tokenizer.chat_template"))
    np_dtype = np.dtype(np.float32 if dtype == "float32" else ml_dtypes.bfloat16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary directory
        shards: list[list[str]] = [[]]
        size = 0
        for name in sorted(have):
            nbytes = int(np.prod(ckpt[name].shape)) * np_dtype.itemsize
            if size and size + nbytes > SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        files = (
            ["model.safetensors"]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        for fname, names in zip(files, shards, strict=True):  # one shard in memory at a time
            tensors = {n: np.asarray(ckpt[n][:], np.float32).astype(np_dtype) for n in names}
            save_file(tensors, tmp / fname, metadata={"format": "pt"})
        if len(files) > 1:
            index = {
                "metadata": {
                    "total_size": sum(int(np.prod(ckpt[n].shape)) for n in have) * np_dtype.itemsize
                },
                "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
            }
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps(ckpt.generation_config(), indent=2) + "\n"
        )
        tokenizer_build.save_tokenizer(tokenizer, tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv) -> int:
    del argv
    if not FLAGS.gguf or not FLAGS.out:
        print("error: --gguf and --out are required", file=sys.stderr)
        return cli_lib.EXIT_BAD_INPUT
    out = write_hf_dir(FLAGS.gguf, Path(FLAGS.out).expanduser(), FLAGS.dtype)
    print(f"wrote {out}")
    return 0


def run() -> None:
    app.run(lambda argv: sys.exit(cli_lib.run_main(lambda: main(argv))))


if __name__ == "__main__":
    run()
