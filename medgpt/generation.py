"""Sampling from a GPT with its KV cache.

This is the single-sequence sampler the training loop uses for its sample completions; the
batched serving engine builds on the same pieces.
"""

from __future__ import annotations

import torch

from medgpt.model import GPT, KVCache
from medgpt.tokenizer import EOT_ID, get_tokenizer


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def complete(
    model: GPT,
    prompt: str,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_k: int = 40,
    seed: int = 0,
) -> str:
    """The text the model appends to ``prompt`` (stops at end-of-text or the context end)."""
    enc = get_tokenizer()
    device = next(model.parameters()).device
    ids = enc.encode_ordinary(prompt)[-(model.config.block_size - 1) :] or [EOT_ID]
    budget = min(max_new_tokens, model.config.block_size - len(ids))
    was_training = model.training
    model.eval()
    try:
        gen = torch.Generator(device=device).manual_seed(seed)
        cache = KVCache(model.config, batch_size=1, device=device)
        logits, _ = model(torch.tensor([ids], device=device), kv_cache=cache)
        out: list[int] = []
        for _ in range(budget):
            nxt = sample_next(logits[:, -1, :], temperature, top_k, gen)
            token = int(nxt.item())
            if token == EOT_ID:
                break
            out.append(token)
            if cache.pos >= cache.max_len:
                break
            logits, _ = model(nxt.view(1, 1), kv_cache=cache)
        return enc.decode(out)
    finally:
        model.train(was_training)
