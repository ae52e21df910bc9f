"""LongAlign Train LoRA: trains a LoRA from the graph.

Glue over :mod:`training.job_request` (the request and its checks) and :mod:`training.graph_job`,
which runs the bundled trainer as a child process with ComfyUI's own Python (training never shares
the server's process). This node resolves its inputs
inside ComfyUI's folders (:mod:`.paths`), frees ComfyUI's loaded models, turns the job's events into
ComfyUI's progress bar (the latest validation image as its preview) and a ``longalign.train``
message for the plot on the node (``web/js/train_plot.js``), maps ComfyUI's Cancel to the job's
cancel (the trainer checkpoints and exits) and, when a MODEL or CLIP is connected, returns it with
the new LoRA applied.

ComfyUI modules (``folder_paths``, ``comfy.*``, ``server``) are imported inside the functions, so
the pack imports outside ComfyUI.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os

from ..training.graph_job import JobCancelled, JobFailed, Progress, Sample, run_job
from ..training.job_request import STAGES, JobInputError, JobRequest, check_request, stage_defaults
from ..training.safe_io import load_tensors
from .paths import PathRefused, resolve_in
from .reward import blocked

NODE = "LongAlign Train LoRA"
EVENT = "longalign.train"
"""The websocket message of the plot, to the client that queued the prompt: ``{"node", "display_node",
"prompt_id", "step", "total", "scalars"}`` per logged step, ``{..., "status", "message"}`` at the end."""
RUNS_FOLDER = "longalign_runs"
"""The run folders (config, log, metrics, checkpoints, validation samples), in ComfyUI's output folder."""
CAPTIONERS = "captioners"
"""The models folder of BLIP captioners (comat), registered with ``folder_paths``."""
PLOTTED = ("loss", "reward")
PREVIEW_PIXELS = 512
MAX_PROMPTS_FILE = 16 * 2**20
LORA_SUFFIX = ".safetensors"
"""Added to lora_name by the job; a name given with it is taken without it."""
INPUT_NAMES = {"name": "lora_name", "checkpoint": "ckpt_name"}
""":class:`JobRequest` fields whose node input has another name."""


def _register_captioners() -> None:
    try:
        import folder_paths
    except ImportError:  # the pack imported outside ComfyUI
        return
    folder_paths.add_model_folder_path(CAPTIONERS, os.path.join(folder_paths.models_dir, CAPTIONERS), is_default=True)


_register_captioners()


@functools.lru_cache(maxsize=1)
def _stage_tooltip() -> str:
    lines = ["What to train. The paper's settings, used where a number below is 0 (the warm-up: at most a tenth "
             "of the run):"]
    for stage in STAGES:
        d = stage_defaults(stage)
        length = f"{d['steps']} steps" if d["steps"] else f"{d['epochs']} epoch(s) over the data"
        sampler = f", {d['sampling_steps']} sampling steps" if d["sampling_steps"] else ""
        lines.append(f"- {stage}: {d['summary']}. Rank {d['rank']}, lr {d['lr']:g} (warm-up {d['warmup_steps']}), "
                     f"{d['resolution']} px, batch {d['batch_size']}, {length}{sampler}.")
    return "\n".join(lines)


class InputError(ValueError):
    """A node input refused before anything runs; the message names the input."""


def _refused(e: JobInputError) -> InputError:
    """The job's refusal, worded with the node's input name."""
    message = str(e).removeprefix(f"{e.input}: ")
    return InputError(f"{NODE}: {INPUT_NAMES.get(e.input, e.input)}: {message}")


def _resolve(value: str, field: str, folders: list[str], expected: str) -> str:
    """``value`` found in ``folders`` (:func:`.paths.resolve_in`), else :class:`JobInputError` for ``field``."""
    try:
        return resolve_in(value, field, folders)
    except (FileNotFoundError, PathRefused, ValueError) as e:
        message = str(e).removeprefix(f"{field}: ")
        raise JobInputError(field, f"{message}; expected {expected}") from None


def _prompts(prompts: str, prompts_file: str) -> list[str]:
    """The multiline prompts, one per line, then those of ``prompts_file`` (in the input folder)."""
    import folder_paths

    found = [line.strip() for line in prompts.splitlines() if line.strip()]
    if prompts_file.strip():
        path = _resolve(prompts_file.strip(), "prompts_file", [folder_paths.get_input_directory()],
                        "a text file in ComfyUI's input folder, one prompt per line")
        if not os.path.isfile(path) or os.path.getsize(path) > MAX_PROMPTS_FILE:
            raise JobInputError("prompts_file", f"{prompts_file!r} is not a text file of at most "
                                                f"{MAX_PROMPTS_FILE // 2**20} MB; expected one prompt per line")
        try:
            with open(path, encoding="utf-8") as f:
                found += [line.strip() for line in f if line.strip()]
        except UnicodeDecodeError:
            raise JobInputError("prompts_file", f"{prompts_file!r} is not UTF-8 text; expected one prompt per "
                                                "line") from None
    return found


def build_request(ckpt_name: str, stage: str, prompts: str, steps: int, rank: int, lr: float, resolution: int,
                  lora_name: str, resume: bool, overwrite: bool, seed: int, prompts_file: str = "",
                  image_folder: str = "", captioner: str = "", sampling_steps: int = 0, batch_size: int = 0,
                  validate_every: int = 0, reward_model=None) -> JobRequest:
    """The job of the node's inputs: every path resolved inside ComfyUI's folders (:mod:`.paths`),
    the run folder under output/longalign_runs, the LoRA into the first models/loras folder."""
    import comfy.model_management
    import folder_paths

    input_dir = [folder_paths.get_input_directory()]
    return JobRequest(
        checkpoint=_resolve(ckpt_name, "checkpoint", folder_paths.get_folder_paths("checkpoints"),
                            "an SD1.5 or SDXL checkpoint in models/checkpoints"),
        stage=stage, name=lora_name.removesuffix(LORA_SUFFIX), prompts=_prompts(prompts, prompts_file),
        image_folder=_resolve(image_folder.strip(), "image_folder", input_dir,
                              "a folder of images with .txt captions in ComfyUI's input folder")
        if image_folder.strip() else None,
        captioner=_resolve(captioner.strip(), "captioner", folder_paths.get_folder_paths(CAPTIONERS),
                           "a BLIP captioner folder in models/captioners") if captioner.strip() else None,
        reward_model=getattr(reward_model, "source", None),  # where the loader read it: the trainer loads it again
        steps=steps, rank=rank, lr=lr, resolution=resolution, sampling_steps=sampling_steps, batch_size=batch_size,
        validate_every=validate_every, seed=seed, resume=resume, overwrite=overwrite,
        device="cpu" if comfy.model_management.get_torch_device().type == "cpu" else "auto",
        run_root=os.path.join(folder_paths.get_output_directory(), RUNS_FOLDER),
        loras_dir=folder_paths.get_folder_paths("loras")[0],
    )


def _send(payload: dict) -> None:
    from server import PromptServer

    server = PromptServer.instance
    server.send_sync(EVENT, payload, server.client_id)


class _Reporter:
    """The job's events -> ComfyUI's progress bar (with the latest validation image) and the plot."""

    def __init__(self, ids: dict, total: int):
        import comfy.utils

        self.ids = ids
        self.bar = comfy.utils.ProgressBar(total, node_id=ids["node"])
        self.step, self.total = 0, total

    def __call__(self, event) -> None:
        if isinstance(event, Progress):
            self.step, self.total = event.step, event.total
            _send({**self.ids, "step": event.step, "total": event.total, "scalars": _plotted(event.scalars)})
            self._bar(None)
        elif isinstance(event, Sample):
            self._bar(event.path)

    def _bar(self, image: str | None) -> None:
        import comfy.model_management

        preview = None
        if image is not None:
            from PIL import Image

            try:
                with Image.open(image) as im:
                    preview = ("JPEG", im.convert("RGB"), PREVIEW_PIXELS)
            except OSError as e:
                logging.warning("%s: validation image %s not shown: %s", NODE, image, e)
        try:
            self.bar.update_absolute(self.step, self.total, preview)
        except comfy.model_management.InterruptProcessingException:
            # ComfyUI's progress hook raises on Cancel and clears the flag: set it again, so that the
            # job's should_cancel sees it and the trainer checkpoints before the node stops.
            comfy.model_management.interrupt_current_processing(True)

    def finish(self, status: str, message: str) -> None:
        _send({**self.ids, "status": status, "message": message})


def _plotted(scalars: dict) -> dict[str, float]:
    """The plotted scalars of a metrics row; a non-finite one is left out (JSON has no NaN)."""
    return {k: float(v) for k, v in scalars.items()
            if k in PLOTTED and isinstance(v, (int, float)) and math.isfinite(v)}


def _cancel_requested() -> bool:
    import comfy.model_management

    return comfy.model_management.processing_interrupted()


def _output_image(path: str | None) -> list[dict]:
    """The ``ui`` image entry of a validation grid in the output folder (none outside it)."""
    import folder_paths

    if path is None:
        return []
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(folder_paths.get_output_directory()))
    if rel.startswith(os.pardir):
        return []
    folder, name = os.path.split(rel)
    return [{"filename": name, "subfolder": folder, "type": "output"}]


def _unconnected(what: str):
    """The ``what`` output blocked: its input is not connected."""
    return blocked(f"{NODE}: the {what} output needs the {what} input connected")


class TrainLoRA:
    """Trains a LongAlign LoRA (reward, align or comat stage) with the bundled trainer as a child
    process; writes models/loras/<lora_name>.safetensors and applies it to a connected MODEL/CLIP."""

    @classmethod
    def INPUT_TYPES(cls):
        import folder_paths

        zero = "0 = the stage's paper setting (see stage)"
        return {
            "required": {
                "ckpt_name": (folder_paths.get_filename_list("checkpoints"), {
                    "tooltip": "The base model to train: an SD1.5 or SDXL checkpoint in models/checkpoints (load the "
                               "same one to use the model output)."}),
                "stage": (list(STAGES), {"default": "reward", "tooltip": _stage_tooltip()}),
                "prompts": ("STRING", {
                    "multiline": True, "default": "",
                    "tooltip": "The training prompts, one per line (long prompts welcome). reward and comat train "
                               "from them; align uses the first four as validation prompts."}),
                "steps": ("INT", {"default": 100, "min": 0, "max": 1_000_000, "tooltip": "Optimizer steps to train "
                                  "(the progress bar counts them); 0 = the stage's paper length."}),
                "rank": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": f"LoRA rank; {zero}."}),
                "lr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 1e-6, "round": False,
                                 "tooltip": f"Learning rate; {zero}."}),
                "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8,
                                       "tooltip": f"Training resolution in pixels (square, a multiple of 8); {zero}."}),
                "lora_name": ("STRING", {
                    "default": "longalign_reward",
                    "tooltip": "The new LoRA's file name in models/loras (.safetensors is added if missing): a plain "
                               "name, no folders. Its run (log, checkpoints, validation images) is in "
                               "output/longalign_runs/<lora_name>."}),
                "resume": ("BOOLEAN", {"default": False, "tooltip": "Continue this lora_name's run from its latest "
                                                                     "checkpoint, e.g. after Cancel (same inputs)."}),
                "overwrite": ("BOOLEAN", {"default": False, "tooltip": "Start this lora_name's run over, replacing "
                                                                        "its LoRA and checkpoints."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "control_after_generate": False,
                                 "tooltip": "Seed of the run: the same inputs and seed train the same LoRA."}),
            },
            "optional": {
                "reward_model": ("REWARD_MODEL", {"tooltip": "reward stage: the preference model, from Reward Model "
                                                            "Loader."}),
                "model": ("MODEL", {"tooltip": "Connect (from the same checkpoint) to get it back with the new LoRA."}),
                "clip": ("CLIP", {"tooltip": "Connect (from the same checkpoint) to get it back with the new LoRA."}),
                "prompts_file": ("STRING", {"default": "", "tooltip": "A text file in ComfyUI's input folder, one "
                                                                      "prompt per line, added to prompts."}),
                "image_folder": ("STRING", {"default": "", "tooltip": "align stage: a folder in ComfyUI's input "
                                                                      "folder of images with same-named .txt captions "
                                                                      "(cat.png + cat.txt)."}),
                "captioner": ("STRING", {"default": "", "tooltip": "comat stage: a BLIP captioner folder "
                                                                   "(transformers) in models/captioners."}),
                "sampling_steps": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "reward and comat: the "
                                           f"sampler steps each training image is made with; {zero}."}),
                "batch_size": ("INT", {"default": 0, "min": 0, "max": 1024,
                                       "tooltip": f"Prompts or images per step; {zero}."}),
                "validate_every": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip": "A validation image "
                                           "(shown on the node) every N steps; 0 = four per run."}),
            },
            "hidden": {"node_id": "UNIQUE_ID", "dynprompt": "DYNPROMPT"},
        }

    RETURN_TYPES = ("STRING", "MODEL", "CLIP")
    RETURN_NAMES = ("lora_name", "model", "clip")
    OUTPUT_TOOLTIPS = (
        "The new LoRA's file name, as LoraLoader lists it (<lora_name>.safetensors).",
        "The connected model with the new LoRA applied (strength 1).",
        "The connected CLIP with the new LoRA applied (strength 1; unchanged by a UNet-only LoRA).",
    )
    OUTPUT_NODE = True
    FUNCTION = "train"
    CATEGORY = "LongAlign/training"
    DESCRIPTION = (
        "Trains a LongAlign LoRA on a checkpoint: reward (the decomposed preference reward, from prompts), "
        "align (images with long captions) or comat (concept matching). The trainer runs as its own process "
        "while the node shows the steps, a live loss and reward plot and the latest validation image. Cancel "
        "stops it after a checkpoint: queue it again with resume on to continue. The LoRA is saved to "
        "models/loras and applied to the model and clip outputs."
    )

    def train(self, ckpt_name, stage, prompts, steps, rank, lr, resolution, lora_name, resume, overwrite, seed,
              reward_model=None, model=None, clip=None, prompts_file="", image_folder="", captioner="",
              sampling_steps=0, batch_size=0, validate_every=0, node_id="", dynprompt=None):
        import comfy.model_management
        import folder_paths

        try:
            request = build_request(ckpt_name, stage, prompts, steps, rank, lr, resolution, lora_name, resume,
                                    overwrite, seed, prompts_file, image_folder, captioner, sampling_steps,
                                    batch_size, validate_every, reward_model)
            check_request(request)
        except JobInputError as e:
            raise _refused(e) from None
        comfy.model_management.unload_all_models()  # the trainer gets the GPU to itself
        comfy.model_management.soft_empty_cache(True)
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        ids = {"node": node_id, "prompt_id": context.prompt_id if context else None,
               "display_node": dynprompt.get_display_node_id(node_id) if dynprompt is not None else node_id}
        report = _Reporter(ids, steps)
        try:
            result = run_job(request, report, _cancel_requested)
        except JobCancelled as e:
            report.finish("cancelled", str(e))
            logging.info("%s: %s", NODE, e)
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException() from e
        except JobInputError as e:  # the run folder got locked by another process since the check
            report.finish("failed", str(e))
            raise _refused(e) from None
        except JobFailed as e:
            report.finish("failed", str(e).splitlines()[0])
            raise RuntimeError(f"{NODE}: {e}") from None
        folder_paths.filename_list_cache.pop("loras", None)  # LoraLoader lists the new file on the next refresh
        name = os.path.basename(result.lora_path)
        message = f"{name}: {result.steps} steps, saved in models/loras"
        report.finish("done", message)
        if model is not None or clip is not None:
            import comfy.sd

            model, clip = comfy.sd.load_lora_for_models(model, clip, load_tensors(result.lora_path, "LoRA"), 1.0, 1.0)
        history = [{"step": row["step"], **_plotted(row)} for row in result.history]
        ui = {"longalign_train": [json.dumps({"history": history, "total": report.total, "message": message},
                                             allow_nan=False)],
              "images": _output_image(result.samples[-1] if result.samples else None)}
        return {"ui": ui, "result": (name, model if model is not None else _unconnected("model"),
                                     clip if clip is not None else _unconnected("clip"))}
