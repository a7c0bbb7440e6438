"""
Fine-tune an exported nanochat model (scripts.hf_export) with the Hugging Face `Trainer` on your own
conversations, then import the result back as a nanochat checkpoint:

    python -m scripts.hf_export -i sft -o hf/d20
    python -m scripts.hf_finetune --hf_dir hf/d20 --data my.jsonl --out_dir hf/d20-mine --max_steps 200
    python -m scripts.chat_cli -i sft --model_tag hf_finetune

    # GPUs, DeepSpeed ZeRO-2 (NOT tested in this repo's CI, which has no GPU and no DeepSpeed):
    pip install deepspeed
    torchrun --standalone --nproc_per_node=8 -m scripts.hf_finetune --hf_dir hf/d20 --data my.jsonl \
        --out_dir hf/d20-mine --deepspeed dev/deepspeed_zero2.json

--data is JSONL, one conversation per line, as for tasks/customjson.py: a list of {"role",
"content"} messages (or {"messages": [...]}), optional system message first, then user/assistant
turns. Each conversation is rendered by nanochat's own render_conversation (the tokenizer read back
from the export's tokenizer.json), and the loss mask is ours: only the assistant's tokens (and its
<|assistant_end|>, and its tool calls, not the tool's outputs) have labels; everything else is
-100. transformers' causal-LM loss shifts the labels by one, so it is our SFT loss.

The trained model is saved to --out_dir in the same HF format (fp32 weights), and (rank 0) imported
into <base dir>/<stage>_checkpoints/<--model_tag> at step --max_steps, unless --import_as none.
Needs the optional dependencies: pip install -e '.[hf]' (transformers, safetensors, accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

IGNORE = -100  # transformers' ignore index for labels


def build_examples(conversations: list[dict], tokenizer, max_seq_len: int) -> list[dict]:
    """Each conversation -> {input_ids, labels}: labels are the ids where our mask is 1, else -100."""
    examples = []
    for conversation in conversations:
        ids, mask = tokenizer.render_conversation(conversation, max_tokens=max_seq_len)
        examples.append({"input_ids": ids, "labels": [i if m == 1 else IGNORE for i, m in zip(ids, mask)]})
    return examples


def make_collator(pad_id: int):
    """A batch of examples -> right-padded tensors (B, T) with attention_mask, padding labelled -100."""
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        T = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), T), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return collate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune an exported nanochat model with the HF Trainer.")
    parser.add_argument("--hf_dir", required=True, help="an HF nanochat directory (scripts.hf_export)")
    parser.add_argument("--data", required=True, help="JSONL of conversations")
    parser.add_argument("--out_dir", required=True, help="where the fine-tuned HF model is written")
    parser.add_argument("--max_steps", type=int, default=100, help="optimiser steps")
    parser.add_argument("--batch_size", type=int, default=4, help="conversations per device per step")
    parser.add_argument("--grad_accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (linear decay to 0)")
    parser.add_argument("--max_seq_len", type=int, default=2048, help="conversations are cut to this many tokens")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--deepspeed", default=None, help="a DeepSpeed config, e.g. dev/deepspeed_zero2.json")
    parser.add_argument("--import_as", default="sft", choices=["base", "mid", "sft", "rl", "none"],
                        help="stage to import the result under (none: do not import)")
    parser.add_argument("--model_tag", default="hf_finetune", help="tag of the imported checkpoint")
    args = parser.parse_args(argv)
    for flag in ("max_steps", "batch_size", "grad_accum", "max_seq_len"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1 (got {getattr(args, flag)})")

    from nanochat.hf_convert import (EXPORT_META_FILE, HFFormatError, require_hf_packages, save_as_checkpoint,
                                     tokenizer_from_hf)
    require_hf_packages("hf_finetune", "accelerate", "transformers")  # the Trainer needs accelerate
    import transformers
    from tasks.customjson import CustomJSON

    try:
        with open(os.path.join(args.hf_dir, "tokenizer.json")) as f:
            tokenizer = tokenizer_from_hf(json.load(f), os.path.join(args.hf_dir, "tokenizer.json"))
        task = CustomJSON(args.data)
    except FileNotFoundError as e:  # CustomJSON's own message for --data, the bare path for --hf_dir
        sys.exit(f"hf_finetune: {e if e.filename is None else f'{e.filename} does not exist'} (--hf_dir: a "
                 f"directory written by `python -m scripts.hf_export`; --data: a JSONL file of conversations)")
    except (OSError, ValueError) as e:  # HFFormatError is a ValueError
        sys.exit(f"hf_finetune: {e}")
    conversations = [task.row_example(i) for i in range(task.num_rows())]
    examples = build_examples(conversations, tokenizer, args.max_seq_len)
    print(f"{len(examples)} conversations from {args.data}, "
          f"{sum(sum(label != IGNORE for label in e['labels']) for e in examples):,} assistant tokens trained on")

    cuda = torch.cuda.is_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_dir)
    training_args = transformers.TrainingArguments(
        output_dir=args.out_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none",
        seed=args.seed, bf16=cuda, use_cpu=not cuda, remove_unused_columns=False, deepspeed=args.deepspeed,
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=examples,
                                   data_collator=make_collator(hf_tokenizer.pad_token_id))
    # (no processing_class: the Trainer would copy the tokenizer's pad id into the model config,
    # and NanoChatModel makes that row of the embedding a padding_idx, frozen in later fine-tuning)
    trainer.train()
    trainer.save_model(args.out_dir)  # every rank (ZeRO-3 gathers here); rank 0 writes safetensors + configs
    if torch.distributed.is_initialized():  # what follows is rank 0's alone (save_checkpoint has barriers)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not trainer.is_world_process_zero():
        return
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print("losses: " + " ".join(f"{loss:.4f}" for loss in losses))
    hf_tokenizer.save_pretrained(args.out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    with open(os.path.join(args.out_dir, EXPORT_META_FILE), "w") as f:
        json.dump({"step": args.max_steps, "source": {"finetuned_from": os.path.abspath(args.hf_dir),
                                                      "data": os.path.abspath(args.data)}}, f, indent=2)
    print(f"saved the fine-tuned model to {args.out_dir}")
    if args.import_as != "none":
        try:
            checkpoint_dir, step, _ = save_as_checkpoint(args.out_dir, args.import_as, args.model_tag, args.max_steps)
        except HFFormatError as e:
            sys.exit(f"hf_finetune: {e}")
        print(f"imported as step {step} in {checkpoint_dir}: "
              f"python -m scripts.chat_cli -i {args.import_as} --model_tag {args.model_tag}")


if __name__ == "__main__":
    main()
