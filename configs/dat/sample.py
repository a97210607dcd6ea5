"""DAT Stage A (DAT spec §2.2): N inpainted prompts per behaviour, scored and K selected.

    # paper values: LLaDA-8B-Base sampler, Llama-3-8B-Instruct target, StrongREJECT judge
    MIXAT_DATA_DIR=/path/to/harmbench \
    python -m mixat_jax.dat_sample --config configs/dat/sample.py \
        --config.judge_model=/path/to/judge --workdir runs/dat_sample_llama3_8b
    # tiny random models on CPU in seconds (no downloads, refusal judge)
    python -m mixat_jax.dat_sample --config configs/dat/sample.py:tiny --workdir /tmp/dat_sample_tiny

Reference values (provenance as in dat.md): sampler ``GSAI-ML/LLaDA-8B-Base`` [P] with the
Lüdke/AAPL inpainting settings (32 steps for P = 32 prompt tokens, temperature 0, low-confidence
remasking, conditioning dropout, global remasking 8 every 8 steps; canvas ``[MASK] x 32 +
"\\nAnswer: " + target``) [C]; target ``meta-llama/Meta-Llama-3-8B-Instruct`` [P, "Instruct" I];
behaviours/targets: the 100 HarmBench adv-training behaviours and their 12 targets each from
``$MIXAT_DATA_DIR`` (default ``data/harmbench``) [C]; N = 1000, K = 16 [P]; StrongREJECT judge
[P] (``--config.judge_model`` = a local judge checkpoint; the rubric is this project's
StrongREJECT-style judge) with threshold 0.5 [R]; greedy completions of 256 tokens [C];
selection = judge score descending then target loss ascending, filled by lowest target loss
[R]; bf16 [P]; 200 draws per sampler call (5 units per behaviour; divisible by 1/2/4/8 devices),
50 rows per generation call; pure data parallelism over every local device
(``mesh.data=-1``).

``:tiny`` builds a random tiny LLaDA-layout diffusion LM and a random tiny causal chat model
plus the synthetic safety world's training behaviours (CSV) and targets (JSON) into
``--config.tiny.cache_dir`` (default ``WORKDIR/tiny``): 3 behaviours x N = 8, K = 3, P = 8,
16 new tokens, the offline ``refusal`` judge, float32, one device.
"""

import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
from mixat_jax.dat.sample_config import SampleConfig, SamplerSpec, TinySpec, to_config_dict
from mixat_jax.mesh import MeshConfig
from mixat_jax.training.run_config import HARMBENCH_DIR, harmbench_paths

DATA_DIR = os.environ.get("MIXAT_DATA_DIR", HARMBENCH_DIR)
ARGS = ("", "tiny")


def get_config(arg=None):
    arg = (arg or "").strip()
    if arg not in ARGS:
        raise ValueError(f"configs/dat/sample.py argument {arg!r} unknown; use one of {ARGS}")
    if arg == "tiny":
        cfg = SampleConfig(
            diffusion_model="",
            target_model="",
            limit=3,
            num_samples=8,
            num_selected=3,
            prompt_length=8,
            sampler=SamplerSpec(steps=8),
            judge="refusal",
            max_new_tokens=16,
            batch_size=4,
            gen_batch_size=4,
            dtype="float32",
            mesh=MeshConfig(data=1, fsdp=1, tensor=1),
            tiny=TinySpec(),
        )
        return to_config_dict(cfg)
    paths = harmbench_paths(DATA_DIR)
    return to_config_dict(SampleConfig(behaviors=paths["behaviors"], targets=paths["targets"]))
