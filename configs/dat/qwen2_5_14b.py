"""DAT Stage B on Qwen2.5-14B-Instruct (DAT spec §2.3; CAT on Stage A's inpainted prompts).

    # Stage A against this target model: N = 1000 inpaintings per behaviour with
    # LLaDA-8B-Base, K = 16 kept (spec §2.2)
    python -m mixat_jax.dat_sample --config configs/dat/sample.py \
        --config.target_model=Qwen/Qwen2.5-14B-Instruct --workdir runs/dat_sample_qwen2_5_14b
    # Stage B: this config (reads runs/dat_sample_qwen2_5_14b/selected.jsonl)
    MIXAT_DATA_DIR=/path/to/harmbench \
    python -m mixat_jax.train --config configs/dat/qwen2_5_14b.py --workdir runs/qwen2_5_14b_dat

``config.dat.selected``: ``$MIXAT_DAT_SELECTED`` if set, else
``runs/dat_sample_qwen2_5_14b/selected.jsonl`` (Stage A selects against the target model, so
each model has its own Stage A directory); ``--config.dat.selected=FILE`` overrides both.
Refusals are looked up by the original behaviour in ``$MIXAT_DATA_DIR``'s safe-response CSV;
utility rows are UltraChat ``train_sft`` (``--config.data.utility=FILE`` for a local copy).

Values (provenance as in dat.md: [P] paper via secondary notes, [C] checked code, [R] our
reconstruction). Where DAT is silent the CAT value is used (spec §2.3: the upstream C-AdvUL
trainer, ``configs/cat.py:qwen2_5_14b,upstream``):

* model ``Qwen/Qwen2.5-14B-Instruct`` [P, "Instruct" I]; base weights ``bfloat16`` (DAT: BF16,
  not CAT's 4-bit/FP16) [P]; LoRA r 64 / alpha 16 / dropout 0.1, all linear [C];
* variant ``dat``: the CAT step (continuous attack, C-AdvUL; no discrete rewrites,
  ``discrete.schedule=none``) [P "CAT on the enlarged set"]; eps 0.05 (relative) [C];
  ``attack.iters`` 40 signed steps [P: DAT's Qwen run; its CAT baseline used 20] of 1e-4 [C];
  away/toward weights 0.5/0.5, cutoffs -5/0.5 [C];
* ``loss.utility_weight`` 0.45 [P, "utility .45 vs .25"; R: read as the loss weight, with CAT's
  0.125 : 0.875 mixture];
* ``optim.learning_rate`` 1e-4 [P, stated for Llama; R: used for Qwen too] (CAT 2e-4); AdamW
  cosine, wd 1e-3, clip 0.3 [C]; 5 epochs [C];
* batch 8 [P] = CAT's per-device batch 8 [C] = one micro-batch of 8 rows here (1 adversarial
  pair + 7 utility rows, "fixed" composition = the 0.125 mixture), grad-accum 8 [C, DAT silent]:
  64 rows per AdamW step, the same layout as ``configs/cat.py`` [R: "batch" read as per-device
  batch, the CAT trainer's unit]; max length 256 for both row kinds [C] (inpainted prompts are
  32 tokens, no PAP rewrite needs the 384 MixAT uses).

Memory/devices: AOT per device (``python bench/aot_memory.py --config configs/dat/qwen2_5_14b.py
--meshes 1x8x1``: this config's step with 40 attack iterations, layout, LoRA and remat at
Qwen2.5-14B shapes, 8 simulated CPU devices; bench/results/aot_memory_dat_qwen2_5_14b.md): fsdp=8
25.0 GiB. Each of the data x fsdp batch shards gets its own 1 + 7 composition (issue #16), so on 8 devices
``grad_accum`` 8 means 8 x 8 x 8 = 512 rows per step; the paper's 64 rows per step on 8 devices is
``--config.grad_accum=1`` (1 + 7 rows per device, the same step shapes as the AOT figure above: 8
adversarial + 56 utility slots; one token mean over the step instead of the mean of 8 micro-batch
means). Recommended:
8 accelerators with >= 40 GB each.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from configs.common import dat_config  # noqa: E402


def get_config(arg=None):
    if arg:
        raise ValueError(f"configs/dat/qwen2_5_14b.py takes no argument; got {arg!r}")
    c = dat_config("qwen2_5_14b")
    c.attack.iters = 40
    return c
