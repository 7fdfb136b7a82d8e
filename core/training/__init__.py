"""Training loops, one checkpoint format (`checkpoint`): the contrastive / LiT stage of the retriever's encoder
(`contrastive`), reader fine-tuning and projector alignment (`finetune`), retriever distillation from the frozen
reader's judgement (`distill`, its settings in `settings`). Run directories and stage markers are the pipeline's
(`dxrag.core.run`)."""
