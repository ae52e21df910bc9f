"""The one training loop of every stage, on accelerate: models, LoRA, optimizer, data, checkpoints,
resume, logging, progress bar, and the LoRA file ComfyUI loads.

Checkpoints are accelerate ``save_state`` folders holding only what trains (LoRA, adapter),
optimizer, scheduler and RNG states, plus ``trainer_state.json``; each is written to a temporary
folder and renamed when complete, so ``--resume`` always finds a whole one. Randomness that decides
the samples (caption dropout, noise, timesteps, the K gradient steps) comes from a generator seeded
by ``(seed, step, micro-batch, process)``, so a resumed run draws exactly what the uninterrupted run
would have drawn.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from . import config as config_mod
from .clip_text import TransformersClipBackend
from .conditioning import TextConditioner
from .config import TrainConfig
from .data import DataError, ImageCaptionDataset, PromptDataset, collate, read_records
from .lora import add_lora, kohya_state_dict, merge_kohya_lora
from .lora_format import load_reference_lora
from .models import load_components
from .safe_io import atomic_open, commit_folder, load_tensors, save_tensors
from .t5 import load_t5_branch
from .validation import save_grid

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
LORA_FILE = "lora_weights.safetensors"
OBJECTIVE_STATE_FILE = "objective_state.safetensors"
METRICS_FILE = "metrics.jsonl"
"""One JSON line per logging step (the same scalars as TensorBoard), for scripts and tests."""
MAX_NONFINITE_IN_A_ROW = 5


class TrainingError(RuntimeError):
    """A run that cannot go on (no data, repeated non-finite losses, bad resume state)."""


@dataclass
class Run:
    """What a stage hands the loop: the objective and the trainable modules beside the UNet LoRA
    (e.g. the TextAdapter in ``align``). ``adopt`` receives them back wrapped by accelerate
    (DDP), for the objective to call from then on."""

    objective: object
    extra_modules: list[torch.nn.Module] = field(default_factory=list)
    adopt: Callable[[list[torch.nn.Module]], None] = lambda modules: None
    validate: Callable[[], "np.ndarray"] | None = None
    """Validation images ``(N, H, W, 3)`` uint8 of the model as it is now (main process only)."""
    state: Callable[[], dict[str, torch.Tensor]] | None = None
    """Tensors of what the objective trains itself (CoMat's discriminator), saved with every checkpoint."""
    load_state: Callable[[dict[str, torch.Tensor]], None] | None = None
    """Restores :attr:`state` on resume."""


def weight_dtype_for(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def base_model_hash(cfg: TrainConfig) -> str:
    """sha256 (first 16 hex) of the base checkpoint file, or of the UNet weights of a folder."""
    path = cfg.model.pretrained
    if cfg.model.tiny or not path:
        return "tiny"
    if os.path.isdir(path):
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
            candidate = os.path.join(path, "unet", name)
            if os.path.isfile(candidate):
                path = candidate
                break
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def latest_checkpoint(output_dir: str) -> str | None:
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(root, d, STATE_FILE)))
    return os.path.join(root, done[-1]) if done else None


def step_generator(seed: int, step: int, micro: int, rank: int, device: torch.device) -> torch.Generator:
    key = hashlib.sha256(f"{seed}/{step}/{micro}/{rank}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(key[:8], "little") & ((1 << 63) - 1))


def _trainable_state(unet: torch.nn.Module, extras: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
    state = {f"unet.{n}": p.detach() for n, p in unet.named_parameters() if p.requires_grad}
    for i, module in enumerate(extras):
        state.update({f"extra{i}.{n}": p.detach() for n, p in module.named_parameters() if p.requires_grad})
    return state


def train(cfg: TrainConfig, build_run) -> str:
    """Run ``cfg``; ``build_run(cfg, components, accelerator, weight_dtype, conditioner)`` -> :class:`Run`.
    Returns the path of what it wrote first: the UNet LoRA, or (TextCraftor, whose UNet is frozen) the
    trained text encoder's folder; ``run.output_dir`` on processes other than the main one."""
    out = cfg.run.output_dir
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    mixed = cfg.run.mixed_precision
    if cpu and mixed != "no":
        print(f"[train] no GPU: mixed precision {mixed!r} -> 'no' (fp32 on the CPU)", file=sys.stderr)
        mixed = "no"
    accelerator = Accelerator(
        mixed_precision=mixed, gradient_accumulation_steps=cfg.run.grad_accum, cpu=cpu,
        log_with=None if cfg.run.log_with == "none" else cfg.run.log_with,
        project_config=ProjectConfiguration(project_dir=out, logging_dir=os.path.join(out, "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    set_seed(cfg.run.seed)
    print(f"[train] process {accelerator.process_index}; processes: {accelerator.num_processes}; "
          f"device: {accelerator.device}; {accelerator.distributed_type}", file=sys.stderr, flush=True)
    if accelerator.is_main_process:
        print(config_mod.describe(cfg), flush=True)
        os.makedirs(out, exist_ok=True)
        with atomic_open(os.path.join(out, "config.json")) as f:
            f.write(config_mod.describe(cfg))

    needs_images = cfg.stage in ("align", "lcm")
    records = read_records(cfg.data.path, need_images=needs_images)
    dataset = ImageCaptionDataset(records, cfg.data.resolution) if needs_images else PromptDataset(records)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.data.batch_size, shuffle=True, collate_fn=collate,
        num_workers=cfg.data.num_workers, generator=torch.Generator().manual_seed(cfg.run.seed),
    )

    components = load_components(cfg.model)
    dtype = weight_dtype_for(accelerator)
    device = accelerator.device
    for module in (components.unet, components.vae, components.text_encoder):
        module.requires_grad_(False).to(device, dtype)
    for path in cfg.model.init_lora:  # merged in order: e.g. the alignment LoRA, then an LCM student
        named = (load_reference_lora(path, components.unet.config)
                 if path.endswith((".pt", ".pth")) else load_tensors(path, "model.init_lora"))
        merge_kohya_lora(components.unet, named)
    lora_params = add_lora(components.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets)
    for p in lora_params:
        p.data = p.data.float()
    unet = accelerator.prepare(components.unet)
    components.unet = unet
    t5 = None
    if cfg.model.t5:
        t5 = load_t5_branch(cfg.model.t5, cfg.model.adapter, cfg.model.t5_tokenizer)
        t5.encoder.to(device, dtype)
        trains_adapter = cfg.stage == "align"
        t5.adapter.requires_grad_(trains_adapter).to(device, torch.float32 if trains_adapter else dtype)
    conditioner = TextConditioner(TransformersClipBackend(components.tokenizer, components.text_encoder),
                                  cfg.model.token_length, t5)
    run = build_run(cfg, components, accelerator, dtype, conditioner)
    params = lora_params + [p for m in run.extra_modules for p in m.parameters() if p.requires_grad]

    optimizer_cls = torch.optim.AdamW
    optim_kw = {"fused": True} if device.type == "cuda" and cfg.run.mode == "fast" else {}
    if cfg.optim.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise TrainingError("optim.use_8bit_adam needs bitsandbytes (pip install bitsandbytes)") from e
        optimizer_cls, optim_kw = bnb.optim.AdamW8bit, {}
    optimizer = optimizer_cls(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                              weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps, **optim_kw)
    warmup = cfg.optim.warmup_steps * (accelerator.num_processes if cfg.optim.scale_warmup_by_processes else 1)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup)

    prepared = accelerator.prepare(*run.extra_modules, optimizer, loader, lr_scheduler)
    extras = list(prepared[: len(run.extra_modules)])
    run.adopt(extras)
    optimizer, loader, lr_scheduler = prepared[-3:]
    trainable = [unet, *extras]

    def save_hook(models, weights, folder):
        if accelerator.is_main_process:
            raw = [accelerator.unwrap_model(m) for m in trainable]
            save_tensors(_trainable_state(raw[0], raw[1:]), os.path.join(folder, "trainable.safetensors"))
            if run.state is not None:
                save_tensors(run.state(), os.path.join(folder, OBJECTIVE_STATE_FILE))
        weights.clear()

    def load_hook(models, folder):
        state = load_tensors(os.path.join(folder, "trainable.safetensors"), "checkpoint")
        if run.load_state is not None:
            run.load_state(load_tensors(os.path.join(folder, OBJECTIVE_STATE_FILE), "checkpoint", str(device)))
        raw = [accelerator.unwrap_model(m) for m in trainable]
        for prefix, module in [("unet.", raw[0])] + [(f"extra{i}.", m) for i, m in enumerate(raw[1:])]:
            own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            params_by_name = dict(module.named_parameters())
            for name, value in own.items():
                params_by_name[name].data.copy_(value)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)

    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / cfg.run.grad_accum))
    total_steps = cfg.run.max_steps or cfg.run.epochs * steps_per_epoch
    step = 0
    if cfg.run.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            print(f"[train] --resume: no complete checkpoint in {out}; starting from step 0", file=sys.stderr)
        else:
            try:  # accelerate unpickles optimizer/scheduler/RNG states weights-only: no code runs
                accelerator.load_state(ckpt)
                with open(os.path.join(ckpt, STATE_FILE), encoding="utf-8") as f:
                    step = int(json.load(f)["step"])
            except Exception as e:  # noqa: BLE001  (torch, accelerate and json raise many types)
                raise TrainingError(
                    f"--resume: checkpoint {ckpt} cannot be loaded ({type(e).__name__}: {e}); it is damaged, from "
                    "another configuration, or holds objects other than tensors (refused); delete it to resume "
                    "from the one before"
                ) from e
            print(f"[train] resumed from {ckpt} at step {step}", file=sys.stderr)
    if accelerator.is_main_process:
        accelerator.init_trackers("longalign", config={k: str(v) for k, v in config_mod.as_dict(cfg).items()})

    def save_checkpoint() -> None:
        root = os.path.join(out, CHECKPOINTS)
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
                    json.dump({"step": step, "stage": cfg.stage}, f)
                commit_folder(tmp, final)
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise TrainingError(
                f"could not write the checkpoint {final} at step {step} (disk full?): {e}; the last complete "
                f"checkpoint {latest_checkpoint(out) or '(none yet)'} is kept: free space and rerun with --resume"
            ) from e
        if accelerator.is_main_process:
            done = sorted(d for d in os.listdir(root) if d.startswith("step-") and not d.endswith(".tmp"))
            for old in done[:-cfg.run.keep_checkpoints]:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)
        accelerator.wait_for_everyone()

    progress = tqdm(total=total_steps, initial=step, desc=f"{cfg.stage}", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    skipped_images = 0
    nonfinite_in_a_row = nonfinite_total = 0
    last_logs: dict[str, torch.Tensor] = {}
    grad_norm = torch.tensor(0.0)
    start, first_step = time.perf_counter(), step
    done_batches = step * cfg.run.grad_accum
    epoch, skip = divmod(done_batches, batches_per_epoch)
    unet.train()
    while step < total_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        skip = 0
        used_this_epoch = 0
        for micro, batch in enumerate(batches):
            skipped_images += batch["skipped"]
            if not batch["caption"]:
                continue
            used_this_epoch += len(batch["caption"])
            generator = step_generator(cfg.run.seed, step, micro % cfg.run.grad_accum, accelerator.process_index, device)
            with accelerator.accumulate(*trainable):
                loss, logs = run.objective.loss(batch, generator)
                finite = torch.isfinite(loss.detach())
                if accelerator.num_processes > 1:  # skip together: a lone skipper would hang DDP's backward
                    finite = accelerator.gather(finite.reshape(1)).all()
                if not finite:
                    nonfinite_in_a_row += 1
                    nonfinite_total += 1
                    optimizer.zero_grad(set_to_none=True)
                    if nonfinite_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                        raise TrainingError(
                            f"{nonfinite_in_a_row} non-finite (NaN/inf) losses in a row at step {step}: stopping "
                            f"(lower optim.lr or check the data); the last complete checkpoint is "
                            f"{latest_checkpoint(out) or '(none yet)'}"
                        )
                    continue
                nonfinite_in_a_row = 0
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.optim.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            last_logs = {"loss": loss.detach(), **logs}
            progress.update(1)
            if step % cfg.run.log_every == 0 or step == total_steps:
                scalars = {k: float(v) for k, v in last_logs.items()}
                scalars.update(lr=lr_scheduler.get_last_lr()[0], grad_norm=float(grad_norm),
                               skipped_images=skipped_images, nonfinite_losses=nonfinite_total)
                accelerator.log(scalars, step=step)
                if accelerator.is_main_process:
                    with open(os.path.join(out, METRICS_FILE), "a", encoding="utf-8") as f:
                        f.write(json.dumps({"step": step, **scalars}) + "\n")
                rate = (step - first_step) / max(time.perf_counter() - start, 1e-9)
                progress.set_postfix({k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "reward")} | {"it/s": f"{rate:.3g}"})
            if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total_steps:
                save_checkpoint()
            if run.validate and cfg.run.validate_every and step % cfg.run.validate_every == 0 and accelerator.is_main_process:
                images = run.validate()
                save_grid(images, os.path.join(out, "samples", f"step-{step:07d}.png"))
                if cfg.run.log_with == "tensorboard":
                    accelerator.get_tracker("tensorboard").writer.add_images("validation", images, step, dataformats="NHWC")
            if step >= total_steps:
                break
        if used_this_epoch == 0 and skipped_images:
            raise DataError(f"every image in data.path {cfg.data.path!r} is missing or unreadable ({skipped_images} skipped)")
        epoch += 1
    progress.close()
    save_checkpoint()
    written: list[str] = []
    if accelerator.is_main_process:
        if any(p.requires_grad for p in lora_params):  # TextCraftor freezes the UNet LoRA: nothing to write
            lora_path = os.path.join(out, LORA_FILE)
            save_tensors(kohya_state_dict(accelerator.unwrap_model(unet), cfg.lora.alpha), lora_path, metadata={
                "longalign.stage": cfg.stage, "longalign.base_model_hash": base_model_hash(cfg),
                "longalign.rank": str(cfg.lora.rank), "longalign.alpha": str(cfg.lora.alpha),
                "longalign.steps": str(step), "longalign.config": config_mod.describe(cfg),
                "longalign.skipped_images": str(skipped_images),
            })
            written.append(lora_path)
        for i, module in enumerate(extras):
            folder = os.path.join(out, "adapter" if i == 0 else f"extra{i}")
            raw = accelerator.unwrap_model(module)
            if hasattr(raw, "save_pretrained"):
                tmp = folder + ".tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                raw.save_pretrained(tmp)
                commit_folder(tmp, folder)
                written.append(folder)
        print(f"[train] {step} steps; written: {', '.join(written)}; skipped images: {skipped_images}; "
              f"non-finite losses skipped: {nonfinite_total}", flush=True)
    accelerator.end_training()
    return written[0] if written else out
