"""Weights out: PEFT adapters (`save_adapter`) and merged full HF checkpoints (`save_merged`).

`save_adapter` writes `adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names
(`lora_A.weight` [r, in], `lora_B.weight` [out, r]) so `peft.PeftModel.from_pretrained` loads it,
e.g. into HarmBench's evaluation harness; `out_dir` may be a URL (`gs://...`, issue #16: staged
locally, then uploaded through `mixat_jax.storage`). `save_merged` folds the adapters into the base kernels
and writes a plain HF checkpoint (config.json + model.safetensors, sharded above a size limit).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mixat_jax import lora as lora_lib
from mixat_jax import storage
from mixat_jax.hf import keys
from mixat_jax.hf.safetensors_io import save_file
from mixat_jax.models.decoder import Decoder


def _np(x) -> np.ndarray:
    import jax

    return np.asarray(jax.device_get(x))


def save_adapter(model: Decoder, out_dir: str | Path, *, base_model: str | None = None):
    """Writes the model's LoRA adapter in PEFT format; returns the directory (an
    ``etils.epath.Path`` when ``out_dir`` is a URL)."""
    if model.lora_config() is None:
        raise ValueError("model has no LoRA adapter to save; attach one with model.add_lora(...)")
    if not storage.is_url(out_dir):
        return _save_adapter_local(model, Path(out_dir), base_model)
    staged = Path(tempfile.mkdtemp(prefix="mixat_jax_adapter_"))
    try:
        _save_adapter_local(model, staged, base_model)
        storage.copy_dir(staged, out_dir)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return storage.run_path(out_dir)


def _save_adapter_local(model: Decoder, out: Path, base_model: str | None) -> Path:
    lcfg = model.lora_config()
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, lin in model.layers.linears().items():
        if lin.lora_a is None:
            continue
        a, b = _np(lin.lora_a[...]), _np(lin.lora_b[...])
        for i in range(a.shape[0]):
            tensors[keys.peft_key(i, name, "A")] = np.ascontiguousarray(a[i].T)
            tensors[keys.peft_key(i, name, "B")] = np.ascontiguousarray(b[i].T)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lcfg.r,
        "lora_alpha": lcfg.alpha,
        "lora_dropout": lcfg.dropout,
        "target_modules": sorted(lcfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def save_merged(
    model: Decoder, out_dir: str | Path, *, tokenizer=None, max_shard_bytes: int = 4 << 30
) -> Path:
    """Writes merged (base + LoRA) weights as a Hugging Face safetensors checkpoint."""
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kernels = lora_lib.merged_kernels(model)
    tensors: dict[str, np.ndarray] = {}
    for rule in keys.rules_for(cfg.model_type):
        node = model
        for p in rule.path[:-1] if rule.path[-1] in ("kernel", "bias", "weight") else rule.path:
            node = getattr(node, p, None)
        leaf = rule.path[-1]
        if rule.path == ("lm_head",):
            if model.lm_head is None:
                continue
            value = _np(model.lm_head[...])
        elif rule.path == ("embed_tokens",):
            value = _np(model.embed_tokens[...])
        elif leaf == "kernel":
            value = _np(kernels[rule.path[1]])
        else:
            var = getattr(node, leaf, None)
            if var is None:
                continue
            value = _np(var[...])
        if rule.stacked:
            for i in range(cfg.num_layers):
                v = value[i]
                tensors[keys.hf_name(rule, i)] = np.ascontiguousarray(v.T if rule.transpose else v)
        else:
            tensors[keys.hf_name(rule, None)] = np.ascontiguousarray(
                value.T if rule.transpose else value
            )
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name in sorted(tensors):
        if size and size + tensors[name].nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += tensors[name].nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, out / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        index = {
            "metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
            "weight_map": weight_map,
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(cfg.to_hf(), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
