"""Helpers the reader tests share: requests of mixed prompt lengths, and a few LoRA steps."""

from __future__ import annotations

import torch

from dxrag.core.base.records import CorpusItem
from dxrag.core.reader.model import ScoreRequest, TargetRequest


def requests_for(ds, n=5, candidates=None):
    """Closed-book and context requests with different prompt lengths (left padding differs across the batch)."""
    out = []
    for i, q in enumerate(ds.queries["val"][:n]):
        ctx = None if i % 3 == 0 else ds.corpus[i]
        if i % 4 == 1:
            ctx = CorpusItem(id=f"long{i}", image=ds.corpus[i].image, text=ds.corpus[i].text + " mild eye" * i)
        out.append(ScoreRequest(q, ctx, candidates))
    return out


def lora_losses(reader, examples, root, steps: int, lr: float) -> list[float]:
    """The answer loss of (query, context) `examples` before each of `steps` AdamW steps on the trainable
    parameters, then after the last."""
    examples = [TargetRequest(q, c) for q, c in examples]
    optimizer = torch.optim.AdamW([p for p in reader.model.parameters() if p.requires_grad], lr=lr)
    reader.model.train()
    losses = []
    for _ in range(steps):
        loss = reader.answer_loss(examples, root)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(float(reader.answer_loss(examples, root)))
    return losses


def assert_generate_is_greedy(reader, dataset, questions, batch_size: int) -> None:
    """`reader.generate` over open questions (the first closed-book, the others with a corpus context), batched and
    left-padded, equals a plain greedy loop over the processor's own inputs of each prompt, one token at a time up to
    `reader.config.generate_max_tokens` or the end token (M-RoPE token types extended for Qwen2-VL)."""
    from dxrag.core.base.dataset import open_image
    from dxrag.core.base.records import Query
    from dxrag.core.reader.model import GenerateRequest
    from dxrag.core.reader.prompts import prompt_images, render_prompt

    requests = []
    for i, text in enumerate(questions):
        q = Query(id=f"open{i}", image=dataset.queries["val"][i].image, question=text, candidates=(), label="",
                  metadata={"answer_type": "open"})
        requests.append(GenerateRequest(q, None if i == 0 else dataset.corpus[i]))
    got = reader.generate(requests, dataset.root, batch_size=batch_size)
    tok = reader.tokenizer
    for r, text in zip(requests, got):
        prompt = render_prompt(reader.processor, r.query, r.context)
        images = [open_image(dataset.root / rel) for rel in prompt_images(r.query, r.context)]
        inputs = dict(reader.processor(text=[prompt], images=[images], return_tensors="pt", add_special_tokens=False))
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        new = []
        with torch.inference_mode():
            for _ in range(reader.config.generate_max_tokens):
                nxt = int(reader.hf_model(**inputs).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
                for key, value in (("input_ids", nxt), ("attention_mask", 1), ("mm_token_type_ids", 0)):
                    if key in inputs:
                        inputs[key] = torch.cat([inputs[key], torch.tensor([[value]])], dim=1)
        assert text == tok.decode(new, skip_special_tokens=True).strip()
    assert all(got)
