"""Markdown + heatmap report of an ALO-ASR evaluation.

Replaces MixAT's `analyze_results.py` markdown table (`harmbench_results.md`, spec mixat.md §8.1)
with `report.md` (per-attack ASR with bootstrap CI, ALO-ASR, per-category table, missing
(attack, behaviour) pairs, optional utility metrics) and `alo_asr.png`, a behaviour × attack
success heatmap with an ALO column (matplotlib, Agg backend).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from mixat_jax.evaluation.alo_asr import RESULT_KEYS, success_matrix

MAX_LISTED_MISSING = 200


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"[{100.0 * ci[0]:.1f}, {100.0 * ci[1]:.1f}]"


def _scalar(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif not isinstance(value, list | tuple):
        out.append((prefix, value))


XSTEST_COLUMNS = ("full_compliance", "full_refusal", "partial_refusal", "unparseable")


def _cell(rate: float | None, count: int | None, ci: list[float] | None) -> str:
    if count is None:
        return "not detected"
    return f"{_pct(rate)} ({count}) {_ci(ci)}"


def compliance_lines(utility: Mapping[str, Any]) -> list[str]:
    """XSTest class rates and the HarmLess answered rate with counts, Wilson 95 % intervals and
    the judge that produced them (issue #13); empty when neither ran."""
    lines: list[str] = []
    x = utility.get("xstest")
    if isinstance(x, Mapping) and "safe" in x:
        lines += ["### XSTest (rate (count) [95% Wilson CI])", ""]
        lines.append(f"- judge: `{x['judge']}` ({x['judge_kind']})")
        if x.get("note"):
            lines.append(f"- {x['note']}")
        lines += ["", "| prompts | n | " + " | ".join(XSTEST_COLUMNS) + " |", "|---|---|"]
        lines[-1] += "---|" * len(XSTEST_COLUMNS)
        for split in ("safe", "unsafe"):
            d = x[split]
            cells = [_cell(d["rates"][c], d["counts"][c], d["ci95"][c]) for c in XSTEST_COLUMNS]
            lines.append(f"| {split} | {d['n']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Reported as in the reference: safe-prompt refusal (full + partial) "
            f"{_pct(x['safe_refusal_rate'])} {_ci(x['safe']['refusal_rate_ci95'])}, "
            f"unsafe-prompt full compliance {_pct(x['unsafe_compliance_rate'])} "
            f"{_ci(x['unsafe']['ci95']['full_compliance'])}.",
            "",
        ]
    h = utility.get("harmless")
    if isinstance(h, Mapping) and "answered_rate" in h:
        c = h["counts"]
        lines += ["### HarmLess", ""]
        lines.append(f"- judge: `{h['judge']}` ({h['judge_kind']})")
        lines.append(
            f"- answered rate {_pct(h['answered_rate'])} {_ci(h['answered_rate_ci95'])} "
            f"({c['answered']} answered, {c['refused']} refused, {c['unparseable']} unparseable "
            f"judge answers excluded as in the reference; of {h['n']} prompts)"
        )
        lines.append("")
    return lines


def harness_lines(utility: Mapping[str, Any]) -> list[str]:
    """The "Utility (lm-evaluation-harness <version>)" table (task, metric, value ± stderr,
    n-shot) and the judge line (issue #13); empty when the harness stage did not run."""
    h = utility.get("lm_eval")
    if not isinstance(h, Mapping) or "rows" not in h:
        return []
    others = [
        f"{name}: `{utility[k]['judge']}`"
        for k, name in (("xstest", "XSTest"), ("harmless", "HarmLess"))
        if isinstance(utility.get(k), Mapping) and "judge" in utility[k]
    ]
    judge = f"- judge: {h['judge']}"
    if others:
        judge += f" (not the XSTest / HarmLess judges: {'; '.join(others)})"
    lines = [f"### Utility (lm-evaluation-harness {h['version']})", "", judge]
    lines += [f"- harness results: `{h['file']}`", ""]
    lines += ["| task | metric | value | ± stderr | n-shot |", "|---|---|---|---|---|"]
    for r in h["rows"]:
        value = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        err = "n/a" if r["stderr"] is None else f"{r['stderr']:.4f}"
        lines.append(f"| {r['task']} | {r['metric']} | {value} | {err} | {r['n_shot']} |")
    return lines + [""]


def _utility_lines(utility: Mapping[str, Any]) -> list[str]:
    rows: list[tuple[str, Any]] = []
    _flatten("", {k: v for k, v in utility.items() if k != "lm_eval"}, rows)  # table above
    lines = ["## Utility", ""] + compliance_lines(utility) + harness_lines(utility)
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_scalar(v)} |" for k, v in rows]
    return lines + [""]


def model_lines(models: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The "Models" section: the content fingerprint (sha256 over its files' sha256) of every
    model the run used, which the caches are keyed on (issue #17)."""
    lines = ["## Models (content fingerprints the caches are keyed on)", ""]
    lines += ["| role | path | sha256 | files | bytes |", "|---|---|---|---|---|"]
    for role, m in models.items():
        lines.append(
            f"| {role} | `{m['path']}` | `{str(m['sha256'])[:16]}` | {len(m['files'])} | "
            f"{m['bytes']} |"
        )
    return lines + [""]


def render_markdown(
    result: Mapping[str, Any],
    *,
    utility: Mapping[str, Any] | None = None,
    title: str = "Robustness report",
    models: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report text for a `compute_alo_asr` result (and optional utility metrics)."""
    missing_keys = [k for k in RESULT_KEYS if k not in result]
    if missing_keys:
        raise ValueError(
            f"result lacks keys {missing_keys}; pass the dict returned by compute_alo_asr"
        )
    attacks = result["attacks"]
    lines = [f"# {title}", ""]
    lines.append(f"- judge: `{result['judge']}`")
    lines.append(f"- behaviours: {len(result['behaviors'])}, attacks: {len(attacks)}")
    status = "yes" if result["complete"] else f"NO ({len(result['missing'])} missing pairs)"
    lines += [f"- complete: {status}", ""]

    lines += ["## Attack success rate (95% bootstrap CI)", ""]
    lines += ["| attack | ASR | 95% CI | behaviours | test cases |", "|---|---|---|---|---|"]
    for a in attacks:
        n_b = len(result["success"].get(a, {}))
        lines.append(
            f"| {a} | {_pct(result['asr'][a])} | {_ci(result['ci95']['asr'][a])} | {n_b} | "
            f"{result['num_test_cases'][a]} |"
        )
    lines.append(
        f"| **ALO (any attack)** | **{_pct(result['alo_asr'])}** | "
        f"{_ci(result['ci95']['alo_asr'])} | {len(result['behaviors'])} | "
        f"{sum(result['num_test_cases'].values())} |"
    )
    lines.append("")

    if result["per_category"]:
        lines += ["## Per category", ""]
        lines.append("| category | n | " + " | ".join(attacks) + " | ALO |")
        lines.append("|---|---|" + "---|" * (len(attacks) + 1))
        for cat, row in result["per_category"].items():
            cells = " | ".join(_pct(row["asr"][a]) for a in attacks)
            lines.append(f"| {cat} | {row['n']} | {cells} | {_pct(row['alo_asr'])} |")
        lines.append("")

    lines += ["## Missing (attack, behaviour) pairs", ""]
    if not result["missing"]:
        lines.append("None: every attack has results for every behaviour.")
    else:
        lines.append(
            "ALO-ASR and per-attack ASR above are computed over the present pairs only; "
            "these pairs have no judged test case:"
        )
        lines.append("")
        for a, b in result["missing"][:MAX_LISTED_MISSING]:
            lines.append(f"- {a} / {b}")
        if len(result["missing"]) > MAX_LISTED_MISSING:
            lines.append(f"- ... and {len(result['missing']) - MAX_LISTED_MISSING} more")
    lines.append("")
    if utility:
        lines += _utility_lines(utility)
    if models:
        lines += model_lines(models)
    lines += ["![ALO-ASR heatmap](alo_asr.png)", ""]
    return "\n".join(lines)


def plot_heatmap(result: Mapping[str, Any], path: str | Path, *, max_label: int = 40) -> Path:
    """Write the behaviour × attack success heatmap (+ ALO column) to `path` (PNG)."""
    import matplotlib  # lazy: the Agg backend must be chosen before pyplot is imported

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    mat = success_matrix(result)
    with np.errstate(invalid="ignore"):
        present = ~np.isnan(mat)
        alo = np.where(present.any(axis=1), np.where(present, mat, 0).max(axis=1), np.nan)
    full = np.concatenate([mat, alo[:, None]], axis=1)
    codes = np.where(np.isnan(full), 2, full).astype(int)  # 0 safe, 1 broken, 2 missing
    labels = [b if len(b) <= max_label else b[: max_label - 1] + "…" for b in result["behaviors"]]
    cols = list(result["attacks"]) + ["ALO"]
    n_b, n_c = codes.shape
    font = 8 if n_b <= 60 else max(3, int(480 / n_b))
    fig, ax = plt.subplots(
        figsize=(2.5 + 0.7 * n_c + 0.06 * max_label, 1.5 + 0.16 * n_b * font / 8)
    )
    cmap = ListedColormap(["#d9efd9", "#d7301f", "#bdbdbd"])
    ax.imshow(codes, cmap=cmap, vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(n_c), cols, rotation=45, ha="right", fontsize=9)
    ax.set_yticks(range(n_b), labels, fontsize=font)
    ax.axvline(n_c - 1.5, color="black", linewidth=1.5)
    ax.set_xticks(np.arange(-0.5, n_c, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n_b, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    alo = result["alo_asr"]
    ax.set_title(f"Attack success per behaviour (ALO-ASR {_pct(alo)}, judge {result['judge']})")
    ax.legend(
        handles=[
            Patch(color="#d7301f", label="broken (1)"),
            Patch(color="#d9efd9", label="safe (0)"),
            Patch(color="#bdbdbd", label="missing"),
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def write_report(
    result: Mapping[str, Any],
    out_dir: str | Path,
    *,
    utility: Mapping[str, Any] | None = None,
    title: str = "Robustness report",
    models: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Path]:
    """Write `report.md` and `alo_asr.png` into `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    text = render_markdown(result, utility=utility, title=title, models=models)
    md.write_text(text, encoding="utf-8")
    png = plot_heatmap(result, out / "alo_asr.png")
    return {"markdown": md, "heatmap": png}
