"""A 2-process CPU training run for tests/integrations/test_launcher.py (started by the documented launcher, not by pytest).

    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        tests/integrations/ddp_trainer_script.py OUT_DIR

Each rank trains a tiny model with the Trainer, FreezeKernCallback(moving=False)
without a plan (the traced boundary although the run is short; at Trainer init every rank analyses its own share of the data, the
traces are merged and the boundary agreed on, before DDP wraps the model) and
BackwardProfileCallback, then writes what it
trained to OUT_DIR/rank<r>.json.
"""

import hashlib
import json
import os
import sys

import torch


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=16):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 97, (n, seq), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(out_dir: str) -> None:
    import torch.distributed as dist
    from transformers import Trainer, TrainingArguments, default_data_collator

    import freezekern as fk
    from freezekern.integrations import BackwardProfileCallback, FreezeKernCallback

    torch.set_num_threads(1)
    model = fk.tiny_model("llama", num_layers=6, hidden=32, vocab=97, tie=True, seed=0)
    freeze = FreezeKernCallback(calibration_batches=2, moving=False)
    profile = BackwardProfileCallback(steps=2, warmup=0, repeats=1, print_verdict=False, output_dir=out_dir)
    args = TrainingArguments(
        output_dir=out_dir, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True,  # with a launcher that sets no ACCELERATE_USE_CPU, this is what makes accelerate use gloo
        ddp_find_unused_parameters=False,  # the callback decides at Trainer init, before DDP wraps the model
        report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=default_data_collator,
                      callbacks=[freeze, profile])
    trainer.train()
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256()
    for name, p in trained.items():
        digest.update(name.encode())
        digest.update(p.detach().contiguous().numpy().tobytes())
    record = {
        "rank": dist.get_rank() if dist.is_initialized() else 0,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "distributed_type": getattr(trainer.accelerator.distributed_type, "value", str(trainer.accelerator.distributed_type)),
        "local_rank": os.environ.get("LOCAL_RANK"),
        "boundary": freeze.handle.boundary,
        "trace_tokens": freeze.trace.token_count,
        "trainable": sorted(trained),
        "trained_digest": digest.hexdigest(),
        "profile_rank": profile.report.rank if profile.report is not None else None,
        "profile_lowest_reached": profile.report.yours.lowest_reached if profile.report is not None else None,
    }
    with open(os.path.join(out_dir, f"rank{record['rank']}.json"), "w") as f:
        json.dump(record, f)
    if dist.is_initialized():  # an orderly teardown: gloo's threads left running at exit can abort the process
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
