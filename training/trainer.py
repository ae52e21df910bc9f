"""The one training loop of every stage, on accelerate: models, LoRA, optimizer, data, checkpoints,
resume, interrupts, logging, validation, progress bar, and the LoRA file ComfyUI loads.

:func:`train` reads top to bottom: where the run starts (checked before any model loads, see
:mod:`.run_state`), setup, resume, optimizer steps until done or stopped by a signal (see
:mod:`.interrupts`), then the final checkpoint and outputs.

Checkpoints are accelerate ``save_state`` folders holding only what trains (LoRA, adapter),
optimizer, scheduler and RNG states, plus ``trainer_state.json`` (the step and the run's identity);
each is written to a temporary folder and renamed when complete, so ``--resume`` always finds a
whole one. Randomness that decides the samples (caption dropout, noise, timesteps, the K gradient
steps) comes from a generator seeded by ``(seed, step, micro-batch, process)``, so a resumed run
draws exactly what the uninterrupted run would have drawn.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import config as config_mod
from . import run_state
from .config import TrainConfig
from .data import (DataError, ImageCaptionDataset, PromptDataset, collate, read_records,
                   warn_if_batch_exceeds_data)
from .interrupts import PARENT_PID_ENV, StoppedInSetup, StopRequest, watch_parent
from .lora import add_lora, kohya_state_dict, merge_kohya_lora
from .lora_format import load_reference_lora
from .models import load_components
from .monitoring import METRICS_FILE, IntervalMeans, append_metrics
from .run_state import (CHECKPOINTS, STATE_FILE, StartPoint, TrainingError, base_model_hash,  # noqa: F401 (API)
                        latest_checkpoint)
from .safe_io import atomic_open, commit_folder, load_tensors, save_tensors
from .t5 import load_t5_branch
from .validation import labelled_grid, save_image

LORA_FILE = "lora_weights.safetensors"
OBJECTIVE_STATE_FILE = "objective_state.safetensors"
MAX_NONFINITE_IN_A_ROW = 5
AUTO_VALIDATE_EVERY = 150
"""``run.validate_every auto``: validation images every this many steps on a GPU; none on the CPU."""


@dataclass
class Run:
    """What a stage hands the loop: the objective and the trainable modules beside the UNet LoRA
    (e.g. the TextAdapter in ``align``). ``adopt`` receives them back wrapped by accelerate
    (DDP), for the objective to call from then on."""

    objective: object
    extra_modules: list[torch.nn.Module] = field(default_factory=list)
    adopt: Callable[[list[torch.nn.Module]], None] = lambda modules: None
    validate: Callable[[], "np.ndarray"] | None = None
    """Validation images ``(N, H, W, 3)`` uint8 of the model as it is now (main process only), the same
    prompts and noise every time."""
    validation_prompts: list[str] = field(default_factory=list)
    """The prompts of :attr:`validate`'s images, in order (the grid's labels)."""
    state: Callable[[], dict[str, torch.Tensor]] | None = None
    """Tensors of what the objective trains itself (CoMat's discriminator), saved with every checkpoint."""
    load_state: Callable[[dict[str, torch.Tensor]], None] | None = None
    """Restores :attr:`state` on resume."""


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def as_run(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as it will actually run on this machine: without a GPU (or with ``run.device cpu``) on the
    CPU in fp32 (``mixed_precision`` "no"); ``validate_every auto`` resolved. This is what
    ``config.json``, the checkpoints and the LoRA metadata record."""
    cfg = copy.deepcopy(cfg)
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    if cpu:
        if cfg.run.mixed_precision != "no":
            print(f"[train] no GPU: mixed precision {cfg.run.mixed_precision!r} -> 'no' (fp32 on the CPU)",
                  file=sys.stderr)
        cfg.run.device, cfg.run.mixed_precision = "cpu", "no"
    if cfg.run.validate_every == "auto":
        cfg.run.validate_every = 0 if cpu else AUTO_VALIDATE_EVERY
    return cfg


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


def _trainable_state(unet: torch.nn.Module, extras: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    state = {f"unet.{n}": p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    for i, module in enumerate(extras):
        state.update({f"extra{i}.{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad})
    return state


def resume_command(stage: str, argv: list[str], processes: int) -> str:
    """The command that continues this run: its own arguments, any ``--resume [PATH]`` or ``--run.resume V``
    replaced by ``--resume`` (the latest checkpoint)."""
    kept, i = [], 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("--resume", "--run.resume"):
            if i < len(argv) and (arg == "--run.resume" or not argv[i].startswith("-")):
                i += 1  # its value
        elif not arg.startswith(("--resume=", "--run.resume=")):
            kept.append(arg)
    launcher = ["accelerate", "launch"] if processes > 1 else ["python"]
    return shlex.join([*launcher, "-m", f"training.{stage}", *kept, "--resume"])


class Trainer:
    """One run's state and its steps, in the order :func:`train` calls them."""

    def __init__(self, cfg: TrainConfig, build_run, start: StartPoint, identity: dict):
        self.cfg, self.build_run, self.start, self.identity = cfg, build_run, start, identity
        self.out = cfg.run.output_dir
        self.step = 0
        self.skipped_images = 0
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self.grad_norm = torch.tensor(0.0)
        self.interval = IntervalMeans()
        self.saved_step: int | None = None

    # -- setup -------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Accelerator, output folder, data, models, LoRA, optimizer, checkpoint hooks."""
        cfg = self.cfg
        self.accelerator = accelerator = Accelerator(
            mixed_precision=cfg.run.mixed_precision, gradient_accumulation_steps=cfg.run.grad_accum,
            cpu=cfg.run.device == "cpu", log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
            project_config=ProjectConfiguration(project_dir=self.out, logging_dir=os.path.join(self.out, "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
        set_seed(cfg.run.seed)
        print(f"[train] process {accelerator.process_index}; processes: {accelerator.num_processes}; "
              f"device: {accelerator.device}; {accelerator.distributed_type}", file=sys.stderr, flush=True)
        self.prepare_output_dir()
        self.loader = self.build_loader()
        self.build_models()
        self.build_optimizer()
        self.register_checkpoint_hooks()
        steps_per_epoch = max(1, math.ceil(len(self.loader) / cfg.run.grad_accum))
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch

    def prepare_output_dir(self) -> None:
        """Remove the checkpoints ``run.overwrite`` replaces, write ``config.json`` (main process)."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()  # every process has read the folder before it changes
        if accelerator.is_main_process:
            print(config_mod.describe(self.cfg), flush=True)
            os.makedirs(self.out, exist_ok=True)
            run_state.remove_replaced(self.start)
            if self.start.replaced and os.path.exists(os.path.join(self.out, METRICS_FILE)):
                with atomic_open(os.path.join(self.out, METRICS_FILE)):
                    pass  # the replaced run's rows: this run's log starts empty
            with atomic_open(os.path.join(self.out, "config.json")) as f:
                f.write(config_mod.describe(self.cfg))
        accelerator.wait_for_everyone()

    def build_loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        needs_images = cfg.stage in ("align", "lcm")
        records = read_records(cfg.data.path, need_images=needs_images)
        if self.accelerator.is_main_process:
            warn_if_batch_exceeds_data(records, cfg.data.batch_size, self.accelerator.num_processes)
        dataset = (ImageCaptionDataset(records, cfg.data.resolution, cfg.data.max_image_pixels) if needs_images
                   else PromptDataset(records))
        return torch.utils.data.DataLoader(
            dataset, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate,
            num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.run.seed),
        )

    def build_models(self) -> None:
        """Frozen components in the run's dtype, init LoRAs merged, the trained LoRA added (fp32), T5
        branch, then the stage's :class:`Run`."""
        cfg, accelerator = self.cfg, self.accelerator
        components = load_components(cfg.model)
        self.dtype = dtype = weight_dtype_for(accelerator)
        self.device = device = accelerator.device
        self.family = components.family
        for module in components.frozen_modules():
            module.requires_grad_(False).to(device, dtype)
        for path in cfg.model.init_lora:  # merged in order: e.g. the alignment LoRA, then an LCM student
            named = (load_reference_lora(path, components.unet.config)
                     if path.endswith((".pt", ".pth")) else load_tensors(path, "model.init_lora"))
            merge_kohya_lora(components.unet, named)
        self.lora_params = add_lora(components.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
        for p in self.lora_params:
            p.data = p.data.float()
        self.unet = components.unet = accelerator.prepare(components.unet)
        t5 = None
        if cfg.model.t5:
            t5 = load_t5_branch(cfg.model.t5, cfg.model.adapter, cfg.model.t5_tokenizer)
            t5.encoder.to(device, dtype)
            trains_adapter = cfg.stage == "align"
            t5.adapter.requires_grad_(trains_adapter).to(device, torch.float32 if trains_adapter else dtype)
        conditioner = components.conditioner(cfg.model.token_length, t5)
        self.run = self.build_run(cfg, components, accelerator, dtype, conditioner)
        self.params = self.lora_params + [p for m in self.run.extra_modules for p in m.parameters() if p.requires_grad]

    def build_optimizer(self) -> None:
        """AdamW (fused on CUDA in the fast mode, or bitsandbytes' 8-bit), warm-up then constant, and
        everything that trains prepared by accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        optimizer_cls = torch.optim.AdamW
        optim_kw = {"fused": True} if self.device.type == "cuda" and cfg.run.mode == "fast" else {}
        if cfg.optim.use_8bit_adam:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise TrainingError("optim.use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from e
            optimizer_cls, optim_kw = bnb.optim.AdamW8bit, {}
        optimizer = optimizer_cls(self.params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, **optim_kw)
        warmup = cfg.optim.warmup_steps * (accelerator.num_processes if cfg.optim.scale_warmup_by_processes else 1)
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)
        run = self.run
        prepared = accelerator.prepare(*run.extra_modules, optimizer, self.loader, lr_scheduler)
        self.extras = list(prepared[: len(run.extra_modules)])
        run.adopt(self.extras)
        self.optimizer, self.loader, self.lr_scheduler = prepared[-3:]
        self.trainable = [self.unet, *self.extras]

    def register_checkpoint_hooks(self) -> None:
        """accelerate saves and loads only what trains (and the objective's own state)."""
        accelerator, run = self.accelerator, self.run

        def save_hook(models, weights, folder):
            if accelerator.is_main_process:
                raw = [accelerator.unwrap_model(m) for m in self.trainable]
                save_tensors(_trainable_state(raw[0], raw[1:]), os.path.join(folder, "trainable.safetensors"))
                if run.state is not None:
                    save_tensors(run.state(), os.path.join(folder, OBJECTIVE_STATE_FILE))
            weights.clear()

        def load_hook(models, folder):
            state = load_tensors(os.path.join(folder, "trainable.safetensors"), "checkpoint")
            if run.load_state is not None:
                run.load_state(load_tensors(os.path.join(folder, OBJECTIVE_STATE_FILE), "checkpoint", str(self.device)))
            raw = [accelerator.unwrap_model(m) for m in self.trainable]
            for prefix, module in [("unet.", raw[0])] + [(f"extra{i}.", m) for i, m in enumerate(raw[1:])]:
                own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                params_by_name = dict(module.named_parameters())
                for name, value in own.items():
                    params_by_name[name].data.copy_(value)
            models.clear()

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    # -- resume ------------------------------------------------------------------------------------

    def resume(self) -> None:
        """Load :attr:`start`'s checkpoint (already checked to belong to this run), if any."""
        ckpt = self.start.checkpoint
        if ckpt is not None:
            try:  # accelerate unpickles optimizer/scheduler/RNG states weights-only: no code runs
                self.accelerator.load_state(ckpt)
            except Exception as e:  # noqa: BLE001  (torch, accelerate and json raise many types)
                raise TrainingError(
                    f"--resume: checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {e}); it is damaged or "
                    "holds objects other than tensors (refused); resume from the one before with --resume PATH"
                ) from e
            self.step = self.saved_step = self.start.step
            print(f"[train] resumed from {ckpt} at step {self.step}", file=sys.stderr)
        if self.accelerator.is_main_process:
            self.accelerator.init_trackers("longalign",
                                           config={k: str(v) for k, v in config_mod.as_dict(self.cfg).items()})

    # -- one optimizer step ------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[int, dict]]:
        """``(index in the epoch, batch)`` over the epochs, from where the run stands; batches whose
        images were all unreadable are counted and passed over."""
        cfg, accelerator = self.cfg, self.accelerator
        epoch, skip = divmod(self.step * cfg.run.grad_accum, len(self.loader))
        while True:
            self.loader.set_epoch(epoch)
            batches = accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            skip = 0
            used_this_epoch = 0
            for micro, batch in enumerate(batches):
                self.skipped_images += batch["skipped"]
                if not batch["caption"]:
                    continue
                used_this_epoch += len(batch["caption"])
                yield micro, batch
            if used_this_epoch == 0 and self.skipped_images:
                raise DataError(f"every image in data.path {cfg.data.path!r} is missing or unreadable "
                                f"({self.skipped_images} skipped)")
            epoch += 1

    def _all_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach())
        if self.accelerator.num_processes > 1:  # skip together: a lone skipper would hang DDP's backward
            finite = self.accelerator.gather(finite.reshape(1)).all()
        return bool(finite)

    def optimizer_step(self, batches: Iterator[tuple[int, dict]]) -> None:
        """Micro-batches (``run.grad_accum`` of them) until the optimizer has stepped once; a non-finite
        loss is skipped on every process, :data:`MAX_NONFINITE_IN_A_ROW` in a row stop the run."""
        cfg, accelerator = self.cfg, self.accelerator
        for micro, batch in batches:
            generator = step_generator(cfg.run.seed, self.step, micro % cfg.run.grad_accum, accelerator.process_index,
                                       self.device)
            with accelerator.accumulate(*self.trainable):
                loss, logs = self.run.objective.loss(batch, generator)
                if not self._all_finite(loss):
                    self.nonfinite_in_a_row += 1
                    self.nonfinite_total += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise TrainingError(
                            f"{self.nonfinite_in_a_row} non-finite (NaN/inf) losses in a row at step {self.step}: "
                            f"stopping (lower optim.lr or check the data); the last complete checkpoint is "
                            f"{latest_checkpoint(self.out) or '(none yet)'}"
                        )
                    continue
                self.nonfinite_in_a_row = 0
                self.interval.add({"loss": loss, **logs})
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    self.grad_norm = accelerator.clip_grad_norm_(self.params, cfg.optim.max_grad_norm)
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                self.step += 1
                return

    def after_step(self, progress: tqdm) -> None:
        """Log, checkpoint and validate as the config asks at this step."""
        cfg = self.cfg
        progress.update(1)
        if self.step % cfg.run.log_every == 0 or self.step == self.total_steps:
            self.log(progress)
        if cfg.run.save_every and self.step % cfg.run.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        if (self.run.validate and cfg.run.validate_every and self.step % cfg.run.validate_every == 0
                and self.accelerator.is_main_process):
            self.validate()

    def log(self, progress: tqdm) -> None:
        """The interval's mean scalars to the trackers, ``metrics.jsonl`` and the progress bar."""
        accelerator = self.accelerator
        scalars = self.interval.means(accelerator)
        scalars.update(lr=self.lr_scheduler.get_last_lr()[0], grad_norm=float(self.grad_norm),
                       skipped_images=self.skipped_images, nonfinite_losses=self.nonfinite_total)
        accelerator.log(scalars, step=self.step)
        if accelerator.is_main_process:
            append_metrics(self.out, {"step": self.step, **scalars})
        rate = (self.step - self.first_step) / max(time.perf_counter() - self.started, 1e-9)
        shown = {k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "reward")}
        progress.set_postfix(shown | {"it/s": f"{rate:.3g}"})

    def validate(self) -> None:
        """The run's validation images as one grid labelled with the step and prompts: ``samples/`` and TensorBoard."""
        grid = labelled_grid(self.run.validate(), self.step, self.run.validation_prompts)
        save_image(grid, os.path.join(self.out, "samples", f"step-{self.step:07d}.png"))
        if self.cfg.run.log_with == "tensorboard":
            self.accelerator.get_tracker("tensorboard").writer.add_image("validation", grid, self.step,
                                                                         dataformats="HWC")

    # -- checkpoints -------------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """``checkpoints/step-N``, written under a temporary name and renamed when complete; older ones
        beyond ``run.keep_checkpoints`` pruned. Collective: every process calls it."""
        accelerator, step = self.accelerator, self.step
        root = os.path.join(self.out, CHECKPOINTS)
        final = os.path.join(root, f"step-{step:07d}")
        tmp = final + ".tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(tmp)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with atomic_open(os.path.join(tmp, STATE_FILE)) as f:
                    json.dump({"step": step, "stage": self.cfg.stage, "run": self.identity}, f, indent=1)
                commit_folder(tmp, final)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(
                f"could not write the checkpoint {final} at step {step} (disk full?): {e}; the last complete "
                f"checkpoint {latest_checkpoint(self.out) or '(none yet)'} is kept: free space and rerun with --resume"
            ) from e
        if accelerator.is_main_process:
            done = run_state.step_folders(self.out)
            for old in done[:-self.cfg.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        self.saved_step = step
        return final

    # -- the loop and its end ----------------------------------------------------------------------

    def loop(self, stop: StopRequest) -> bool:
        """Optimizer steps until ``total_steps`` (True) or an agreed stop request (False)."""
        progress = tqdm(total=self.total_steps, initial=self.step, desc=self.cfg.stage,
                        disable=not self.accelerator.is_local_main_process, dynamic_ncols=True)
        self.started, self.first_step = time.perf_counter(), self.step
        self.unet.train()
        batches = self.batches()
        try:
            while self.step < self.total_steps:
                self.optimizer_step(batches)
                self.after_step(progress)
                if self.step < self.total_steps and stop.agreed(self.accelerator):
                    return False
            return True
        finally:
            progress.close()

    def interrupted(self, stop: StopRequest, argv: list[str]) -> str:
        """After an agreed stop: the checkpoint of this step, and where to go on from."""
        ckpt = (os.path.join(self.out, CHECKPOINTS, f"step-{self.step:07d}") if self.saved_step == self.step
                else self.save_checkpoint())
        if self.accelerator.is_main_process:
            command = resume_command(self.cfg.stage, argv, self.accelerator.num_processes)
            print(f"[train] stopped ({stop.received or 'another process was signalled'}) after step {self.step} of "
                  f"{self.total_steps}; checkpoint: {ckpt}\n[train] to continue: {command}", file=sys.stderr,
                  flush=True)
        self.accelerator.end_training()
        return ckpt

    def stopped_in_setup(self, signal_name: str, argv: list[str]) -> str:
        """A signal before the first step (one process): nothing new to save; where to go on from."""
        latest = latest_checkpoint(self.out)
        command = resume_command(self.cfg.stage, argv, 1) if latest else "(the same command: no checkpoint yet)"
        print(f"\n[train] stopped ({signal_name}) before the first step: nothing new to save; latest checkpoint: "
              f"{latest or '(none)'}\n[train] to continue: {command}", file=sys.stderr, flush=True)
        return latest or self.out

    def finish(self) -> str:
        """The last checkpoint, the LoRA file (and trained extra modules); returns the first written."""
        accelerator, cfg = self.accelerator, self.cfg
        if self.saved_step != self.step:
            self.save_checkpoint()
        written: list[str] = []
        if accelerator.is_main_process:
            if any(p.requires_grad for p in self.lora_params):  # TextCraftor freezes the UNet LoRA: nothing to write
                lora_path = os.path.join(self.out, LORA_FILE)
                save_tensors(kohya_state_dict(accelerator.unwrap_model(self.unet), cfg.lora.alpha), lora_path,
                             metadata=self.lora_metadata())
                written.append(lora_path)
            for i, module in enumerate(self.extras):
                folder = os.path.join(self.out, "adapter" if i == 0 else f"extra{i}")
                raw = accelerator.unwrap_model(module)
                if hasattr(raw, "save_pretrained"):
                    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.", suffix=".tmp", dir=self.out)
                    raw.save_pretrained(tmp)
                    commit_folder(tmp, folder)
                    written.append(folder)
            print(f"[train] {self.step} steps; written: {', '.join(written)}; skipped images: {self.skipped_images}; "
                  f"non-finite losses skipped: {self.nonfinite_total}", flush=True)
        accelerator.end_training()
        return written[0] if written else self.out

    def lora_metadata(self) -> dict[str, str]:
        cfg = self.cfg
        return {**self.family.lora_metadata(),
                "longalign.stage": cfg.stage, "longalign.base_model_hash": base_model_hash(cfg),
                "longalign.rank": str(cfg.lora.rank), "longalign.alpha": str(cfg.lora.alpha),
                "longalign.steps": str(self.step), "longalign.mixed_precision": cfg.run.mixed_precision,
                "longalign.config": config_mod.describe(cfg), "longalign.skipped_images": str(self.skipped_images)}


def train(cfg: TrainConfig, build_run, argv: list[str] | None = None) -> str:
    """Run ``cfg``; ``build_run(cfg, components, accelerator, weight_dtype, conditioner)`` -> :class:`Run`.
    Returns the path of what it wrote first: the UNet LoRA, or (TextCraftor, whose UNet is frozen) the
    trained text encoder's folder; ``run.output_dir`` on processes other than the main one. Stopped by
    SIGTERM/SIGINT, it returns the checkpoint it wrote (``argv``: the command-line arguments to print
    in the ``--resume`` command; default ``sys.argv[1:]``)."""
    cfg = as_run(cfg)
    identity = run_state.identity(cfg)
    start = run_state.start_point(cfg, identity)  # refusals come before any model is loaded
    trainer = Trainer(cfg, build_run, start, identity)
    argv = sys.argv[1:] if argv is None else argv
    with StopRequest(stop_in_setup=int(os.environ.get("WORLD_SIZE", "1")) == 1) as stop:
        if os.environ.get(PARENT_PID_ENV):  # run by a job (training/graph_job.py): stop if it dies
            watch_parent(int(os.environ[PARENT_PID_ENV]))
        try:
            trainer.setup()
            trainer.resume()
            stop.training_started()
        except StoppedInSetup as e:
            return trainer.stopped_in_setup(str(e), argv)
        if not trainer.loop(stop):
            return trainer.interrupted(stop, argv)
        return trainer.finish()
