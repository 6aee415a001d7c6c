"""What a user would write instead of a pipeline DPO round: one plain TRL script, one process.

Loads the SFT policy, trains DPOTrainer with a LoRA adapter (reference = the same model with the adapter disabled,
computed on the fly), with the round's settings from params.yaml (loss, beta, learning rate, epochs, batch,
sequence length), then merges the adapter and saves the model. Used by `make bench-sweep` as the peer of
`reference_logps@r1` + `dpo@r1`; it only reads the project's params and files, none of its code.

    python benchmarks/plain_trl_round.py --project PATH --pairs data/prepared/pairs/r1.jsonl --beta 0.1 --out DIR
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--policy", default="models/policies/sft")
    parser.add_argument("--pairs", default="data/prepared/pairs/r1.jsonl")
    parser.add_argument("--beta", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import yaml
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    params = yaml.safe_load((args.project / "params.yaml").read_text())["dpo"]
    policy = args.project / args.policy
    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy)
    pairs = load_dataset("json", data_files=str(args.project / args.pairs), split="train")
    train = params["train"]
    config = DPOConfig(
        output_dir=str(args.out / "checkpoints"),
        beta=args.beta,
        loss_type=params["loss"]["types"],
        max_length=params["sequence"]["max_length"],
        truncation_mode=params["sequence"]["truncation_mode"],
        learning_rate=train["learning_rate"],
        num_train_epochs=train["epochs"],
        per_device_train_batch_size=train["batch_size"],
        warmup_steps=train["warmup_ratio"],
        lr_scheduler_type=train["scheduler"],
        seed=train["seed"],
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=5,
    )
    lora = params["lora"]
    adapter = LoraConfig(
        r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"], target_modules=lora["target_modules"],
        task_type="CAUSAL_LM",
    )  # fmt: skip
    trainer = DPOTrainer(model=model, args=config, train_dataset=pairs, processing_class=tokenizer, peft_config=adapter)
    trainer.train()
    merged = trainer.model.merge_and_unload()
    merged.save_pretrained(args.out / "model")
    tokenizer.save_pretrained(args.out / "model")
    print(f"steps {trainer.state.global_step}, last loss {trainer.state.log_history[-2].get('loss')}")


if __name__ == "__main__":
    main()
