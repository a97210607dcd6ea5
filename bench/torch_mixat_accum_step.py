"""PyTorch reference of one MixAT/CAT OPTIMIZER step with gradient accumulation (bench only).

What the reference trainer does per optimizer step (MixAT spec §3.1: HF Trainer,
gradient_accumulation_steps = G): for each of the G micro-batches, its own continuous attack
(10 signed-gradient steps on a per-token L2-bounded perturbation of the away rows' prompt
embeddings, LoRA dropout on), then the C-AdvUL loss (0.5 away + 0.5 toward + 1.0 utility, soft
cutoffs) divided by G and backpropagated into LoRA; after the G micro-batches one gradient clip
(0.3) and one AdamW step. With ``--micro_batches 1`` this is the single micro-batch step of
``../shared/bench/torch_cat_step.py``. HF transformers model + peft LoRA, fp32, CPU.

Usage: python bench/torch_mixat_accum_step.py --model DIR [--micro_batches 8] [--adv 1]
       [--util 7] [--len 128] [--prompt_len 64] [--iters 10] [--steps 3] [--threads 2]
       [--lora_r 64]
Prints one JSON line: {"impl": "torch-mixat-accum", "seconds_per_step": median, ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--micro_batches", type=int, default=8)
    p.add_argument("--adv", type=int, default=1)
    p.add_argument("--util", type=int, default=7)
    p.add_argument("--len", type=int, default=128)
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora_r", type=int, default=64)
    return p.parse_args(argv)


def soft_floor(x: torch.Tensor, cutoff: float, slope: float = 1e-3) -> torch.Tensor:
    return torch.where(x >= cutoff, x, cutoff + slope * x)


class Reference:
    def __init__(self, a):
        self.a = a
        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
        lora = LoraConfig(r=a.lora_r, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.table = self.model.get_input_embeddings().weight
        self.eps_abs = 0.075 * self.table.norm(dim=-1).mean().item()
        self.params = [q for q in self.model.parameters() if q.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=2e-4, weight_decay=1e-3)
        self.vocab = self.table.shape[0]

    def rows(self, n: int):
        ids = torch.randint(3, self.vocab, (n, self.a.len))
        labels = ids.clone()
        labels[:, : self.a.prompt_len] = -100
        return ids, labels

    def ce(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=emb, labels=labels).loss

    def attack(self, emb_away: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Signed-gradient PGD on the prompt positions; gradient w.r.t. delta only."""
        a = self.a
        in_prompt = torch.zeros(emb_away.shape[0], a.len, 1)
        in_prompt[:, : a.prompt_len] = 1.0
        delta = torch.zeros_like(emb_away, requires_grad=True)
        for _ in range(a.iters):
            (g,) = torch.autograd.grad(self.ce(emb_away + delta * in_prompt, labels), [delta])
            with torch.no_grad():
                delta -= 1e-4 * g.sign()
                norm = delta.norm(dim=-1, keepdim=True)
                delta.copy_(torch.where(norm > self.eps_abs, delta * self.eps_abs / norm, delta))
        return delta.detach() * in_prompt

    def micro_batch(self, scale: float) -> None:
        a = self.a
        away_ids, away_lab = self.rows(a.adv)
        toward_ids, toward_lab = away_ids.clone(), away_lab.clone()
        toward_ids[:, a.prompt_len :] = torch.randint(3, self.vocab, (a.adv, a.len - a.prompt_len))
        toward_lab[:, a.prompt_len :] = toward_ids[:, a.prompt_len :]
        util_ids, util_lab = self.rows(a.util)
        with torch.no_grad():
            e_away, e_toward = self.table[away_ids].clone(), self.table[toward_ids].clone()
        delta = self.attack(e_away, away_lab)
        away = soft_floor(-self.ce(e_away + delta, away_lab), -5.0)
        toward = soft_floor(self.ce(e_toward + delta, toward_lab), 0.5)
        util = self.model(input_ids=util_ids, labels=util_lab).loss
        ((0.5 * away + 0.5 * toward + 1.0 * util) * scale).backward()

    def optimizer_step(self) -> None:
        self.opt.zero_grad()
        for _ in range(self.a.micro_batches):
            self.micro_batch(1.0 / self.a.micro_batches)
        torch.nn.utils.clip_grad_norm_(self.params, 0.3)
        self.opt.step()


def main(argv=None) -> None:
    a = parse(argv)
    ref = Reference(a)
    times = []
    for step in range(a.steps + 1):  # the first step is a warm-up
        t0 = time.perf_counter()
        ref.optimizer_step()
        if step:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"impl": "torch-mixat-accum", "seconds_per_step": statistics.median(times),
                      "steps": a.steps, "micro_batches": a.micro_batches, "adv": a.adv,
                      "util": a.util, "len": a.len, "iters": a.iters, "lora_r": a.lora_r}))  # fmt: skip


if __name__ == "__main__":
    main()
