"""Training: retriever distillation from the frozen reader's judgement (`distill`) and run directories with
provenance and checkpoints (`runs`). The reader's own fine-tuning lives in `dxrag.core.reader.finetune`."""
