"""`load_pretrained`: HF checkpoint directory (or hub id) -> sharded NNX `Decoder` + tokenizer.

Steps: resolve the path (a hub id downloads through `huggingface_hub` only when the user passes
one; in a multi-process job process 0 downloads first, then a barrier, `download_once`), parse `config.json` into `ModelConfig`, build the *abstract* model (`nnx.eval_shape`, nothing
allocated), then create every parameter with `jax.make_array_from_callback` so each device reads
only its own slice straight from the safetensors memmaps (the whole model never sits on one
device). Missing, unexpected and wrongly-shaped tensors are reported together by name. Pickle
checkpoints (`pytorch_model.bin`) are refused. PEFT adapters load onto the model's LoRA factors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from mixat_jax import mesh as mesh_lib
from mixat_jax.hf import gguf as gguf_io
from mixat_jax.hf import keys
from mixat_jax.hf.safetensors_io import SafetensorsCheckpoint, SafetensorsFile
from mixat_jax.models.config import LINEAR_NAMES, LoraConfig, ModelConfig
from mixat_jax.models.decoder import Decoder
from mixat_jax.models.diffusion_config import require_causal, require_diffusion

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALLOW = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model", "*.txt"]


def resolve(path_or_id: str | Path, what: str = "model") -> Path:
    """A local directory, or a hub id downloaded on explicit request (the user named it)."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    s = str(path_or_id)
    if p.exists():
        raise ValueError(f"{what} path {s!r} is a file; pass the checkpoint directory")
    # "org/name" is a hub id only if "org" is not a local directory (a mistyped local path must
    # never turn into a network request).
    if _HUB_ID.match(s) and not s.startswith((".", "/")) and not p.parent.is_dir():
        try:
            return Path(download_once(s))
        except Exception as e:  # noqa: BLE001 - any hub failure becomes one clear line
            raise ValueError(
                f"{what} {s!r} is not a local directory and could not be downloaded from the "
                f"Hugging Face hub ({type(e).__name__}); pass a local checkpoint directory"
            ) from None
    raise ValueError(f"{what} directory {s!r} does not exist; pass a local checkpoint directory")


def snapshot(hub_id: str, *, local_files_only: bool) -> str:
    """The local snapshot directory of ``hub_id`` in the HF cache (downloaded unless
    ``local_files_only``; then a repository missing from this host's cache raises)."""
    from huggingface_hub import snapshot_download  # lazy: network client, only for hub ids

    return snapshot_download(hub_id, allow_patterns=_ALLOW, local_files_only=local_files_only)


def download_once(
    hub_id: str,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    barrier: Callable[[str], None] | None = None,
) -> str:
    """``snapshot(hub_id)`` for a multi-process job without every process downloading into
    one shared HF cache at once (issue #16): process 0 downloads, then all meet at a barrier,
    then the others read the cache (``local_files_only``) and download only if their cache does
    not have it (caches local to each host, e.g. TPU VMs: then the other hosts download after
    process 0, under huggingface_hub's own file locks). Process 0 reaches the barrier even when
    its download fails (so the others never wait forever), then raises. COLLECTIVE when
    ``process_count > 1``: every process must call it. One process: a plain download."""
    n = jax.process_count() if process_count is None else process_count
    i = jax.process_index() if process_index is None else process_index
    if n == 1:
        return snapshot(hub_id, local_files_only=False)
    barrier = barrier or multihost_utils.sync_global_devices
    path, error = None, None
    if i == 0:
        try:
            path = snapshot(hub_id, local_files_only=False)
        except Exception as e:  # noqa: BLE001 - re-raised after the barrier
            error = e
    barrier(f"mixat_jax.hf.load download {hub_id}")
    if error is not None:
        raise error
    if path is not None:
        return path
    try:
        return snapshot(hub_id, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in this host's cache: download it here
        return snapshot(hub_id, local_files_only=False)


def read_config(directory: Path, **overrides: Any) -> ModelConfig:
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise ValueError(f"{directory}: no config.json; is this a Hugging Face model directory?")
    return ModelConfig.from_hf(json.loads(cfg_path.read_text()), **overrides)


def open_checkpoint(directory: Path) -> SafetensorsCheckpoint:
    ckpt = SafetensorsCheckpoint(directory)
    if len(ckpt) == 0:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt*")
        )
        if pickles:
            raise ValueError(
                f"{directory}: only pickle weights ({', '.join(pickles)}); mixat_jax loads "
                "safetensors only — convert with `save_pretrained(..., safe_serialization=True)`"
            )
        raise ValueError(f"{directory}: no *.safetensors weights found")
    return ckpt


def _default_dtype(directory: Path) -> str:
    hf = json.loads((directory / "config.json").read_text())
    dt = hf.get("torch_dtype") or hf.get("dtype") or "float32"
    return "bfloat16" if dt == "bfloat16" else "float32"


def _sharding_for(variable: nnx.Variable, mesh: Mesh | None, rules) -> jax.sharding.Sharding:
    if mesh is None:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    axes = variable.get_metadata().get("axes")
    return NamedSharding(mesh, mesh_lib.spec_for(axes, variable.get_value().shape, mesh, rules))


def _reader(
    sources: list[np.ndarray], transpose: bool, stacked: bool, dtype: np.dtype
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """Callback returning the requested global slice, reading only what is needed."""

    def view(a: np.ndarray) -> np.ndarray:
        return a.T if transpose else a

    def cb(index: tuple[slice, ...]) -> np.ndarray:
        if stacked:
            layers = range(len(sources))[index[0]]
            rest = index[1:]
            return np.stack([np.asarray(view(sources[i])[rest], dtype=dtype) for i in layers])
        return np.asarray(view(sources[0])[index], dtype=dtype)

    return cb


def _fill_state(
    abstract: nnx.State,
    tensors: dict[tuple[str, ...], tuple[list[str], bool, bool]],
    source,
    mesh: Mesh | None,
    rules,
    errors: list[str],
) -> None:
    """Replaces abstract Variables (in place) with real arrays read through `source`."""
    for path, var in abstract.flat_state():
        path = tuple(str(p) for p in path)
        if path not in tensors:
            continue
        names, transpose, stacked = tensors[path]
        shape = tuple(var.get_value().shape)
        dtype = np.dtype(var.get_value().dtype)
        arrays = [source[n] for n in names]
        per = shape[1:] if stacked else shape
        bad = [
            f"{n} {tuple(a.shape)} (expected {tuple(reversed(per)) if transpose else per})"
            for n, a in zip(names, arrays, strict=True)
            if (a.T.shape if transpose else a.shape) != per
        ]
        if bad:
            errors.append("wrong shape: " + ", ".join(bad))
            continue
        sharding = _sharding_for(var, mesh, rules)
        value = jax.make_array_from_callback(
            shape, sharding, _reader(arrays, transpose, stacked, dtype)
        )
        var.set_value(value)


def load_weights(
    directory: Path, cfg: ModelConfig, mesh: Mesh | None = None, rules=mesh_lib.DEFAULT_RULES
) -> Decoder:
    """Builds the Decoder for `cfg` with weights streamed from the checkpoint in `directory`.

    Tensor names come from the key table of `cfg.model_type` (`keys.rules_for`).
    """
    return weights_from(open_checkpoint(directory), cfg, mesh, rules, where=f"{directory}")


def weights_from(
    ckpt,
    cfg: ModelConfig,
    mesh: Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    *,
    where: str,
    described_by: str = "config.json",
) -> Decoder:
    """`load_weights` on any mapping HF tensor name -> array-like (`.shape`, `.T`, slicing): a
    safetensors checkpoint, or a GGUF file read by `hf.gguf` (#12), whose arrays dequantize only
    the slices each device asks for."""
    table = keys.rules_for(cfg.model_type)
    head_name = next(keys.hf_name(r, None) for r in table if r.path == ("lm_head",))
    abstract = nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    wanted = {tuple(str(p) for p in path) for path, _ in state.flat_state()}
    found: dict[tuple[str, ...], dict[int | None, str]] = {}
    rule_of: dict[tuple[str, ...], keys.Rule] = {}
    unexpected = []
    for name in ckpt:
        m = keys.match(name, table)
        if m is None or m[0].path not in wanted:
            if not _IGNORED.match(name) and not (name == head_name and cfg.tie_word_embeddings):
                unexpected.append(name)
            continue
        rule, layer = m
        if layer is not None and layer >= cfg.num_layers:
            unexpected.append(name)
            continue
        found.setdefault(rule.path, {})[layer] = name
        rule_of[rule.path] = rule
    errors: list[str] = []
    missing = []
    plan = {}
    for path in sorted(wanted):
        got = found.get(path, {})
        stacked = path[0] == "layers"
        idx = list(range(cfg.num_layers)) if stacked else [None]
        lacking = [i for i in idx if i not in got]
        if lacking:
            rule = rule_of.get(path) or next(r for r in table if r.path == path)
            missing += [keys.hf_name(rule, i) for i in lacking]
            continue
        rule = rule_of[path]
        plan[path] = ([got[i] for i in idx], rule.transpose, stacked)
    if missing:
        errors.append(
            f"missing tensors ({len(missing)}): "
            + ", ".join(missing[:12])
            + (" ..." if len(missing) > 12 else "")
        )
    if unexpected:
        errors.append(
            f"unexpected tensors ({len(unexpected)}): " + ", ".join(sorted(unexpected)[:12])
        )
    _fill_state(state, plan, ckpt, mesh, rules, errors)
    if errors:
        raise ValueError(
            f"{where}: checkpoint does not match {described_by} — " + "; ".join(errors)
        )
    return nnx.merge(graphdef, state)


def read_adapter_config(directory: Path) -> LoraConfig:
    cfg_path = directory / "adapter_config.json"
    if not cfg_path.exists():
        raise ValueError(f"adapter directory {directory} has no adapter_config.json (PEFT format)")
    c = json.loads(cfg_path.read_text())
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{directory}: peft_type {c.get('peft_type')!r} is not supported (LORA only)"
        )
    for flag in ("use_rslora", "use_dora"):
        if c.get(flag):
            raise ValueError(f"{directory}: {flag}=true adapters are not supported")
    if c.get("bias", "none") != "none" or c.get("modules_to_save"):
        raise ValueError(
            f"{directory}: adapters with trained biases or modules_to_save are not supported"
        )
    targets = c.get("target_modules") or "all-linear"
    if isinstance(targets, str) and targets != "all-linear":
        targets = [t for t in LINEAR_NAMES if re.fullmatch(targets, t) or t == targets]
    return LoraConfig.make(
        r=int(c["r"]),
        alpha=float(c.get("lora_alpha", c["r"])),
        dropout=float(c.get("lora_dropout", 0.0)),
        targets=targets,
    )


def load_adapter(
    model: Decoder, directory: str | Path, mesh: Mesh | None = None, rules=mesh_lib.DEFAULT_RULES
) -> None:
    """Attaches a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) in place."""
    directory = resolve(directory, "adapter")
    lora = read_adapter_config(directory)
    weights = directory / "adapter_model.safetensors"
    if not weights.exists():
        if (directory / "adapter_model.bin").exists():
            raise ValueError(
                f"{directory}: pickle adapter_model.bin refused; save the adapter as safetensors"
            )
        raise ValueError(f"{directory}: no adapter_model.safetensors")
    tensors = SafetensorsFile(weights)
    model.add_lora(lora)
    n = model.cfg.num_layers
    found: dict[tuple[str, str], dict[int, str]] = {}
    unexpected = []
    for name in tensors:
        m = keys.PEFT_RX.match(name)
        if not m or m.group(3) not in lora.targets or int(m.group(1)) >= n:
            unexpected.append(name)
            continue
        found.setdefault((m.group(3), m.group(4)), {})[int(m.group(1))] = name
    plan, missing = {}, []
    for lin in lora.targets:
        for which, leaf in (("A", "lora_a"), ("B", "lora_b")):
            got = found.get((lin, which), {})
            lacking = [i for i in range(n) if i not in got]
            missing += [keys.peft_key(i, lin, which) for i in lacking]
            if not lacking:
                plan[("layers", lin, leaf)] = ([got[i] for i in range(n)], True, True)
    errors = []
    if missing:
        errors.append(f"missing adapter tensors ({len(missing)}): " + ", ".join(missing[:8]))
    if unexpected:
        errors.append(
            f"unexpected adapter tensors ({len(unexpected)}): " + ", ".join(unexpected[:8])
        )
    graphdef, lora_state, rest = nnx.split(model, nnx.LoRAParam, ...)
    _fill_state(lora_state, plan, tensors, mesh, rules, errors)
    if errors:
        raise ValueError(f"{directory}: adapter does not match the model — " + "; ".join(errors))
    nnx.update(model, lora_state)


def load_tokenizer(directory: Path, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{directory}: could not load the tokenizer ({type(e).__name__}: {e})"
        ) from None
    if len(tok) > cfg.vocab_size:
        raise ValueError(
            f"{directory}: tokenizer has {len(tok)} tokens but config.json vocab_size is "
            f"{cfg.vocab_size}; the tokenizer does not belong to this model"
        )
    return tok


def load_pretrained(
    path_or_hub_id: str | Path,
    *,
    dtype: str | None = None,
    adapter: str | Path | None = None,
    mesh: Mesh | None = None,
    rules=mesh_lib.DEFAULT_RULES,
    with_tokenizer: bool = True,
    kind: str | None = None,
    **config_overrides: Any,
):
    """Loads an HF Llama/Mistral/Qwen2 or masked-diffusion LLaDA/Dream checkpoint (+ PEFT adapter).

    Returns `(model, tokenizer)` (tokenizer is None when `with_tokenizer=False`).
    `dtype`: "float32" | "bfloat16" | None (checkpoint's own dtype).
    `kind`: "causal" or "diffusion" refuses a checkpoint of the other kind in one line, before any
    weight is read (a diffusion LM passed as a chat target, a causal LM passed as an inpainter).
    A path ending in `.gguf` is a llama.cpp file (#12): architecture, weights (dequantized to
    float32 unless `dtype` says otherwise), tokenizer and chat template all come from the file.
    """
    if str(path_or_hub_id).lower().endswith(".gguf"):
        return _load_gguf(
            path_or_hub_id, dtype, adapter, mesh, rules, with_tokenizer, kind, config_overrides
        )
    directory = resolve(path_or_hub_id)
    cfg = read_config(directory, dtype=dtype or _default_dtype(directory), **config_overrides)
    if kind == "causal":
        require_causal(cfg, f"model {str(path_or_hub_id)!r}")
    elif kind == "diffusion":
        require_diffusion(cfg, f"model {str(path_or_hub_id)!r}")
    elif kind is not None:
        raise ValueError(f"load_pretrained kind={kind!r}: use 'causal', 'diffusion' or None")
    tokenizer = load_tokenizer(directory, cfg) if with_tokenizer else None
    if mesh is not None:
        with jax.set_mesh(mesh):
            model = load_weights(directory, cfg, mesh, rules)
    else:
        model = load_weights(directory, cfg, None, rules)
    if adapter is not None:
        load_adapter(model, adapter, mesh, rules)
    return model, tokenizer


def _load_gguf(path, dtype, adapter, mesh, rules, with_tokenizer, kind, overrides):
    """`load_pretrained` for a `.gguf` file: same kind checks, sharded streaming and adapters."""
    ckpt = gguf_io.GGUFCheckpoint(path)
    cfg = ModelConfig.from_hf(ckpt.hf_config, dtype=dtype or "float32", **overrides)
    if kind == "diffusion":
        require_diffusion(cfg, f"model {str(path)!r}")
    elif kind not in (None, "causal"):
        raise ValueError(f"load_pretrained kind={kind!r}: use 'causal', 'diffusion' or None")
    tokenizer = None
    if with_tokenizer:
        # (the file's token count was checked against the vocabulary by GGUFCheckpoint)
        tokenizer = gguf_io.load_tokenizer(path, ckpt.metadata.get("tokenizer.chat_template"))
    where, about = str(ckpt.path), "its GGUF metadata"
    if mesh is not None:
        with jax.set_mesh(mesh):
            model = weights_from(ckpt, cfg, mesh, rules, where=where, described_by=about)
    else:
        model = weights_from(ckpt, cfg, None, rules, where=where, described_by=about)
    if adapter is not None:
        load_adapter(model, adapter, mesh, rules)
    return model, tokenizer
