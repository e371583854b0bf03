"""The trainer behind ``vlmkit finetune``: one object, one method per responsibility.

    trainer = Trainer(args)
    trainer.setup()           # recipe, data, accelerator / DDP, output folder, model, optimizer, schedule
    trainer.resume()          # --resume: weights, optimizer and RNG from the latest checkpoint
    for step in range(trainer.start, trainer.total):
        loss = trainer.step(step)          # one optimisation step
        ...
    trainer.save(step)        # an exact-resume checkpoint (``checkpoint.py``)
    summary = trainer.finish()

``Trainer(args).run()`` does all of it (``vlmkit.train.loop.finetune`` is that call). The order of the
calls is part of the determinism contract (see ``loop.py``): ``setup`` seeds the model init identically
on every rank, then seeds each rank's own dropout stream last; ``resume`` replaces those streams with the
checkpoint's, so a resumed run replays the steps of an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from .data import SupervisedDataset, collate, load_conversations, pad_token_id
from .loop import (
    FINETUNE_META, RANKS_DIR, TRAIN_LOG, FinetuneArgs, _count_4bit, _file_digest, _to_device, batch_indices,
    build_model, check_launch_env, load_base_model, lr_factor, save_outputs, seed_everything, steps_per_epoch,
    unused_mask_keys, write_json_atomic,
)


class Trainer:
    """A ``vlmkit finetune`` job. Attributes are set by :meth:`setup` (see there); ``start`` and ``notes``
    change in :meth:`resume`; ``last_loss`` is the mean loss over ranks of the last :meth:`step`."""

    def __init__(self, args: FinetuneArgs) -> None:
        self.args = args
        self.start = 0
        self.notes: list[str] = []
        self.last_loss = float("nan")
        self.engine = None  # --shard: vlmkit's sharding engine (set up in _setup_optimizer)
        self.t0 = time.time()  # reset when training starts

    # --------------------------------------------------------------------------------------------
    # Setup
    # --------------------------------------------------------------------------------------------

    def setup(self) -> "Trainer":
        """Everything before the first step, in this order: recipe and hyper-parameters, the conversations
        (fail fast, before loading a model), accelerator and output folder, model, optimizer (prepared for
        DDP), dataset and learning-rate schedule, and last each rank's own RNG streams."""
        check_launch_env()
        self._setup_recipe()
        self.conversations = load_conversations(self.args.data, self.args.image_folder,
                                                allow_absolute_paths=self.args.allow_absolute_paths)
        self._setup_accelerator()
        self._setup_model()
        self._setup_optimizer()
        self._setup_data()
        seed_everything(self.args.seed + 7919 * (self.rank + 1))  # per-rank dropout streams
        return self

    def _setup_recipe(self) -> None:
        """The recipe, and the hyper-parameters: arguments, else the recipe's ``defaults``."""
        from .recipes import load_recipe

        args = self.args
        self.recipe = load_recipe(args.recipe)
        d = self.defaults = self.recipe.defaults
        self.lr = args.lr if args.lr is not None else d.lr
        self.batch_size = args.batch_size if args.batch_size is not None else d.batch_size
        self.epochs = args.epochs if args.epochs is not None else d.epochs
        self.max_steps = args.max_steps if args.max_steps is not None else d.max_steps
        self.save_every = args.save_every if args.save_every is not None else d.save_every
        self.max_length = args.max_length if args.max_length is not None else d.max_length
        for name, value in (("batch size", self.batch_size), ("epochs", self.epochs)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")

    def _setup_accelerator(self) -> None:
        """The accelerator (DDP on gloo on CPU hosts), this process's rank, and the output folder:
        existing checkpoints need ``--resume`` or ``--overwrite``."""
        from accelerate import Accelerator

        args = self.args
        from .sharding import check_engine

        self.accelerator = accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
        check_engine(accelerator.distributed_type, args.shard)  # asked-for sharding must be what runs
        self.rank, self.world, self.main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
        self.out = out = Path(args.output)
        existing = ckpt.list_checkpoints(out)
        if existing and not args.resume:
            if not args.overwrite:
                raise ValueError(f"{out} already holds checkpoints ({existing[-1].name}); pass --resume to continue "
                                 "that run or --overwrite to start over")
            accelerator.wait_for_everyone()
            if self.main:
                shutil.rmtree(out / ckpt.CHECKPOINTS, ignore_errors=True)
        accelerator.wait_for_everyone()
        if self.main:
            out.mkdir(parents=True, exist_ok=True)

    def _setup_model(self) -> None:
        """Base model + recipe + stages (``wrapped``, train mode) and its trainable parameters."""
        seed_everything(self.args.seed)  # identical on every rank: same LoRA init everywhere
        hf_model, self.processor = load_base_model(self.args.model, self.recipe, self.accelerator.device)
        self.wrapped, notes = build_model(hf_model, self.recipe, self.args.wrap, tokenizer=self.processor.tokenizer)
        self.notes.extend(notes)
        self.wrapped.train()
        named = [(n, p) for n, p in self.wrapped.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{self.recipe.source}: nothing to train on this model")
        self.params = [p for _, p in named]

    def _setup_optimizer(self) -> None:
        """AdamW over the trainable parameters; model and optimizer prepared by the accelerator (``model``,
        ``aopt``), next to the plain ones (``unwrapped``, ``optimizer``) that checkpoints read and write.

        ``--shard``: vlmkit's own engine (``sharding.make_engine``: FSDP2 or DeepSpeed ZeRO) shards the wrapper
        and builds the optimizer over what it keeps; accelerate then only provides ranks and collectives.
        ``params`` (what gradient clipping sees) is re-read after sharding / preparing: FSDP replaces the
        parameter objects, and clipping the old ones would silently clip nothing."""
        from accelerate.utils import DistributedType

        d, accelerator, args = self.defaults, self.accelerator, self.args
        self.engine = None
        self.sharded = args.shard is not None or accelerator.distributed_type in (DistributedType.FSDP,
                                                                                  DistributedType.DEEPSPEED)
        if self.sharded and (self.save_every or args.resume):
            raise ValueError("exact-resume checkpoints (--save-every / --resume) support single-process and DDP runs; "
                             "under FSDP / DeepSpeed parameters and optimizer state are sharded (see adapters/README.md)")
        if args.shard is not None:
            from .sharding import make_engine

            def make_optimizer(params):
                return torch.optim.AdamW(params, lr=self.lr, betas=tuple(d.betas), weight_decay=d.weight_decay)

            self.engine = make_engine(args.shard, self.world, accelerator.device.type, self.batch_size)
            self.model, self.optimizer, self.params = self.engine.prepare(self.wrapped, make_optimizer, d.max_grad_norm)
            self.unwrapped, self.aopt = self.wrapped, self.optimizer
            return
        self.optimizer = torch.optim.AdamW(self.params, lr=self.lr, betas=tuple(d.betas), weight_decay=d.weight_decay)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:  # no dataloader to infer it from
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = self.batch_size
        self.model, self.aopt = accelerator.prepare(self.wrapped, self.optimizer)
        self.unwrapped = accelerator.unwrap_model(self.model)
        if self.sharded:  # accelerate's FSDP2 / DeepSpeed swap the parameters for sharded ones
            self.params = [p for p in self.model.parameters() if p.requires_grad]

    def _setup_data(self) -> None:
        """The dataset, the schedule (``per_epoch``, ``total``, ``warmup`` steps) and the facts a checkpoint
        must share with this run for ``--resume`` to replay the same data order."""
        args = self.args
        self.dataset = SupervisedDataset(self.conversations, self.processor, args.template, self.max_length)
        self.unused = unused_mask_keys(self.wrapped, self.dataset)
        self.n = len(self.dataset)
        self.per_epoch = steps_per_epoch(self.n, self.batch_size * self.world)
        self.total = self.max_steps if self.max_steps is not None else self.epochs * self.per_epoch
        self.warmup = math.ceil(self.defaults.warmup_ratio * self.total)
        self.facts = {"seed": args.seed, "num_records": self.n, "batch_size": self.batch_size, "world_size": self.world,
                      "data_sha256": _file_digest(args.data), "recipe": self.recipe.name, "total_steps": self.total}
        self.pad_id = pad_token_id(self.processor)

    # --------------------------------------------------------------------------------------------
    # Resume, step, save
    # --------------------------------------------------------------------------------------------

    def resume(self) -> int:
        """Restore weights, optimizer and this rank's RNG from the latest checkpoint in the output folder;
        returns the step to continue from (``start``; 0 without a checkpoint)."""
        last = ckpt.latest_checkpoint(self.out)
        if last is None:
            self.notes.append(f"--resume: no checkpoint in {self.out / ckpt.CHECKPOINTS}; starting at step 0")
            return self.start
        state = ckpt.read_state(last)
        changed = {k: (state.get(k), v) for k, v in self.facts.items() if k != "total_steps" and state.get(k) != v}
        if changed:
            raise ValueError(f"--resume from {last}: the run differs from the checkpoint in {changed} "
                             "(saved, now); the data order would not be replayed")
        ckpt.load_checkpoint(last, self.unwrapped, self.optimizer, self.rank)
        self.start = int(state["global_step"])
        self.notes.append(f"resumed from {last} at step {self.start}")
        return self.start

    def lr_at(self, step: int) -> float:
        """Learning rate of 0-based ``step``: the base rate times the recipe's warm-up + decay schedule."""
        return self.lr * lr_factor(step, self.total, self.warmup, self.defaults.scheduler)

    def step(self, step: int) -> float:
        """One optimisation step on this rank's slice of global batch ``step`` (0-based); returns the loss
        averaged over ranks (also kept as ``last_loss``)."""
        accelerator = self.accelerator
        idx = batch_indices(step, self.n, self.batch_size, self.world, self.rank, self.args.seed)
        batch = collate([self.dataset[i] for i in idx], self.pad_id)
        batch = {k: _to_device(v, accelerator.device) for k, v in batch.items() if k not in self.unused}
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.model(**batch).loss
        if self.engine is not None:  # --shard: the engine clips, steps and zeroes
            self.engine.backward(loss)
            self.engine.step(self.model, self.optimizer, self.params)
        else:
            accelerator.backward(loss)
            max_grad_norm = self.defaults.max_grad_norm
            if max_grad_norm and max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.params, max_grad_norm)
            self.aopt.step()
            self.aopt.zero_grad(set_to_none=True)
        self.last_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        return self.last_loss

    def state_at(self, step: int) -> dict[str, Any]:
        """``trainer_state.json`` of a checkpoint taken after ``step`` steps."""
        epoch, position = divmod(step, self.per_epoch)
        return {"global_step": step, "epoch": epoch, "batch_in_epoch": position, "steps_per_epoch": self.per_epoch,
                **self.facts}

    def save(self, step: int) -> Path:
        """Write the exact-resume checkpoint of step ``step`` (collective: every rank calls it)."""
        return ckpt.save_checkpoint(self.out, step, self.unwrapped, self.optimizer, self.state_at(step), self.rank,
                                    self.main, self.accelerator.wait_for_everyone, self.args.keep_checkpoints)

    # --------------------------------------------------------------------------------------------
    # The whole run
    # --------------------------------------------------------------------------------------------

    def _open_log(self) -> Path:
        """Main process: keep the log lines up to ``start`` (a resumed run rewrites the rest) and report
        the notes and the size of the run."""
        log_path = self.out / TRAIN_LOG
        if self.main:
            kept = []
            if self.start and log_path.is_file():
                kept = [line for line in log_path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= self.start]
            log_path.write_text("".join(line + "\n" for line in kept))
            if not self.args.quiet:
                for note in self.notes:
                    print(f"vlmkit finetune: {note}")
                trainable = sum(p.numel() for p in self.params)
                print(f"vlmkit finetune: recipe {self.recipe.name}, {trainable:,} trainable parameters, {self.n} records, "
                      f"{self.total} steps × {self.batch_size} × {self.world} process(es)")
        return log_path

    def train(self) -> None:
        """Steps ``start`` … ``total - 1``: log each, checkpoint every ``save_every`` steps (not the last one)."""
        from tqdm.auto import tqdm

        log_path = self._open_log()
        main, total = self.main, self.total
        bar = tqdm(total=total, initial=self.start, disable=self.args.quiet or not main, desc="finetune",
                   dynamic_ncols=True)
        self.t0 = time.time()
        with open(log_path, "a") if main else open(os.devnull, "w") as log:
            for step in range(self.start, total):
                loss = self.step(step)
                done = step + 1
                if main:
                    log.write(json.dumps({"step": done, "loss": loss, "lr": self.lr_at(step),
                                          "epoch": step // self.per_epoch}) + "\n")
                    log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
                if self.save_every and done % self.save_every == 0 and done < total:
                    self.save(done)
        bar.close()

    def finish(self) -> dict[str, Any]:
        """The final checkpoint, the outputs (adapter or trained weights, stages, processor) and
        ``finetune.json``; returns the summary."""
        args, out, accelerator = self.args, self.out, self.accelerator
        if not self.sharded and (self.start < self.total or not ckpt.list_checkpoints(out)):
            self.save(self.total)
        if args.save_rank_weights:
            (out / RANKS_DIR).mkdir(parents=True, exist_ok=True)
            # under --shard: this rank's shard of each parameter (what it really holds)
            state = ckpt.trainable_state(self.unwrapped) if self.engine is None else self.engine.local_state(self.model)
            ckpt._save(state, out / RANKS_DIR / f"rank{self.rank}.safetensors")
        summary = {
            "format": "vlmkit-finetune", "version": 1, "recipe": self.recipe.to_dict(), "recipe_file": self.recipe.source,
            "model": args.model, "data": os.path.abspath(args.data), "stages": list(args.wrap),
            "args": dataclasses.asdict(args), "lr": self.lr, "steps": self.total, "resumed_from": self.start,
            "final_loss": self.last_loss, "world_size": self.world, "notes": self.notes,
            "engine": self.engine.name if self.engine is not None
            else str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)),
            "seconds": round(time.time() - self.t0, 3),
            "trainable_parameters": sum(p.numel() for p in self.params),
            "quantized_linear_layers": _count_4bit(self.unwrapped),
        }
        accelerator.wait_for_everyone()
        if self.engine is not None:  # collective: gathers the shards onto rank 0
            full_state = self.engine.full_state(self.model)
        else:
            full_state = accelerator.get_state_dict(self.model) if self.sharded else None
        if self.main:
            save_outputs(out, self.unwrapped, self.recipe, self.processor, full_state)
            write_json_atomic(summary, out / FINETUNE_META)  # temp file + rename, like the checkpoints
            if not args.quiet:
                print(f"vlmkit finetune: wrote {out} (final loss {self.last_loss:.4f})")
        accelerator.wait_for_everyone()
        return summary

    def run(self) -> dict[str, Any]:
        """setup, resume (with ``--resume``), train, finish: the whole ``vlmkit finetune`` job."""
        self.setup()
        if self.args.resume:
            self.resume()
        self.train()
        return self.finish()
