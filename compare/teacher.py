"""Teacher-forced next-token logits on the reference LLM (PyTorch).

Given the image tokens the LLM sees (all of them, or a pruned set) and a continuation
(the unpruned model's greedy output), one forward pass over ``prompt + continuation``
gives the next-token logits of every generation step: step ``t`` is the distribution of
token ``t`` given the prompt and tokens ``0..t-1``. Running two image-token sets on the
same continuation compares their distributions step by step without either one's own
earlier choices leaking in.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def prompt_rows(pipe, prompts: list[str]) -> list[list[int]]:
    """Token ids of the chat-formatted prompts (one image token each)."""
    from fsr.runtime.inputs import format_prompt, tokenize_prompts

    texts = [format_prompt(pipe.processor, p) for p in prompts]
    return tokenize_prompts(pipe.tokenizer, texts, pipe.llava.config.image_token_id)


@torch.no_grad()
def prefix_embeds(pipe, row: list[int], image_embeds: torch.Tensor) -> torch.Tensor:
    """[1, L, H]: the prompt's embeddings with its image token replaced by ``image_embeds`` [K, H]."""
    text = pipe.embedding(torch.tensor([row]))[0]
    at = row.index(pipe.llava.config.image_token_id)
    return torch.cat([text[:at], image_embeds.to(text.dtype), text[at + 1:]])[None]


@torch.no_grad()
def greedy(pipe, prefix: torch.Tensor, max_new_tokens: int) -> list[int]:
    """Greedy continuation of one prefix with Hugging Face ``generate`` (cut after EOS)."""
    from fsr.runtime.reference import cut_after_eos

    out = pipe.llava.generate(inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
                              max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pipe.pad_id,
                              eos_token_id=sorted(pipe.eos))
    return cut_after_eos(out[0].tolist(), pipe.eos)


@torch.no_grad()
def step_logits(pipe, prefix: torch.Tensor, continuation: list[int]) -> np.ndarray:
    """[T, V] float64 logits of generation steps ``0..T-1`` (T = len(continuation))."""
    if not continuation:
        return np.zeros((0, pipe.llava.config.text_config.vocab_size))
    fed = continuation[:-1]
    embeds = prefix if not fed else torch.cat([prefix, pipe.embedding(torch.tensor([fed]))], dim=1)
    logits = pipe.llava(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long)).logits
    start = prefix.shape[1] - 1
    return logits[0, start:start + len(continuation)].double().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def kl_divergence(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(P || Q) per row, in nats, from logits (float64)."""
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return np.maximum((np.exp(log_p) * (log_p - log_q)).sum(axis=-1), 0.0)
