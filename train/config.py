"""Configuration of a training run (``TrainConfig``); the LVLM's own configuration
(``ModelConfig`` and its components) is :mod:`asvr.train.model.config`, re-exported here.

Plain dataclasses with a docstring under each field.  ``asvr-train``'s
command line is generated from ``TrainConfig`` (``config_cli.py``): each
field is one option, its docstring the ``--help`` text, so a new option is
written once, here.  A run folder stores its resolved ``TrainConfig`` in
``train_config.json``, which ``--config`` reads back; ``model_config`` and
``data_config`` build the components the run's flat options configure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asvr.train.data.templates import TEMPLATES
from asvr.train.model.config import (
    ATTN_IMPLEMENTATIONS,
    DTYPES,
    TOWER_SELECT,
    ModelConfig,
    VisionSpec,
    VisionTowerSpec,
    VisualHeadConfig,
    image_tokens,
    tiny_llm_config,
)
from asvr.train.model.vision_input import VISION_INPUTS, get_vision_input

if TYPE_CHECKING:
    from asvr.train.data.dataset import DataConfig

STAGE_DEFAULTS = {"pretrain": {"lr": 1e-3, "template": "plain"}, "sft": {"lr": 2e-5, "template": "vicuna_v1"}}
STAGES = tuple(STAGE_DEFAULTS)
ZERO_STAGES = ("auto", "0", "1", "2", "3")
TEXT_ONLY_VISUAL_LOSS = ("none", "grey-image")


def _opt(group: str, **kw) -> dict[str, Any]:
    return {"group": group, **kw}


IO, MODEL, OPTIM, DATA, RUN = "inputs and outputs", "model", "optimisation", "data", "checkpoints and logging"


@dataclass(kw_only=True)
class TrainConfig:
    """One ``asvr-train`` run; every field is a command-line option (``config_cli.py``)."""

    # ------------------------------------------------------------------ inputs and outputs
    model: str = field(metadata=_opt(IO))
    """LLM: a local Hugging Face folder (config, weights, tokenizer)."""
    tokenizer: str = field(metadata=_opt(IO))
    """Semantic tokenizer artifact folder (asvr-tokenizer): the visual targets."""
    codes: str | None = field(default=None, metadata=_opt(IO))
    """Code shards written with that tokenizer (asvr-pipeline tokenize); required unless --packed."""
    data: list[str] = field(default_factory=list, metadata=_opt(IO))
    """LLaVA JSON conversation file(s): id, image, conversations; required unless --packed."""
    packed: str | None = field(default=None, metadata=_opt(IO))
    """Packed shards (asvr-pipeline pack) streamed per rank instead of --codes/--data: memory flat in corpus
    size, resumable on another number of ranks."""
    shuffle_buffer: int = field(default=512, metadata=_opt(DATA))
    """--packed: rows shuffled together (whole row groups of 64) after the row groups' own seeded order
    (0: the packed order, unshuffled)."""
    images: str | None = field(default=None, metadata=_opt(IO))
    """Image root (LLaVA 'image' paths are relative to it); online/features inputs."""
    output_dir: str = field(metadata=_opt(IO))
    """Run folder: checkpoints/, metrics.jsonl, loss.png, final/, train_config.json."""
    cache_dir: str | None = field(default=None, metadata=_opt(IO))
    """Feature and shard-index cache (default RUN/cache); runs that share it compute the vision
    tower's features of the same images once."""
    # ------------------------------------------------------------------ model
    stage: str = field(default="pretrain", metadata=_opt(MODEL, choices=STAGES))
    """pretrain: projector + visual head, LLM frozen; sft: also the LLM."""
    vision_input: str = field(default="codes", metadata=_opt(MODEL, choices=tuple(VISION_INPUTS)))
    """online: frozen vision tower on the images every step; features: tower features cached once in
    RUN/cache; codes: features rebuilt from the cached codes, no images."""
    vision_tower: str | None = field(default=None, metadata=_opt(MODEL))
    """The LLM's vision tower for online/features inputs: a Hugging Face SigLIP/CLIP vision folder or a
    tokenizer artifact (default: the target tokenizer's encoder)."""
    vision_tower_layer: int | None = field(default=None, metadata=_opt(MODEL))
    """Hidden state of --vision-tower fed to the LLM (default -2 for Hugging Face folders, as LLaVA's
    mm_vision_select_layer; an artifact's recorded layer)."""
    vision_tower_select: str = field(default="patch", metadata=_opt(MODEL, choices=TOWER_SELECT))
    """patch: the patch tokens; cls_patch: CLIP's CLS token first, then the patches (LLaVA's
    mm_vision_select_feature)."""
    init_from: str | None = field(default=None, metadata=_opt(MODEL))
    """Start from an exported model: a pretrain run folder (its final/) or an export folder."""
    template: str | None = field(default=None, metadata=_opt(MODEL, choices=tuple(TEMPLATES)))
    """Conversation template (default: plain for pretrain, vicuna_v1 for sft)."""
    visual_loss_weight: float = field(default=1.0, metadata=_opt(MODEL))
    """lambda of the visual loss: loss = text CE + lambda * mean over depths of the visual CE."""
    head: VisualHeadConfig = field(default_factory=VisualHeadConfig, metadata=_opt(MODEL))
    attn_implementation: str = field(default="auto", metadata=_opt(MODEL, choices=ATTN_IMPLEMENTATIONS))
    """auto: flash_attention_2 when flash_attn imports and CUDA is up, else sdpa."""
    gradient_checkpointing: bool = field(default=False, metadata=_opt(MODEL))
    """Recompute activations in backward."""
    trust_remote_code: bool = field(default=False, metadata=_opt(MODEL))
    """Allow model code shipped in --model."""
    # ------------------------------------------------------------------ optimisation
    zero: str = field(default="auto", metadata=_opt(OPTIM, choices=ZERO_STAGES))
    """ZeRO stage when no --deepspeed config is given. auto: 0 on one process (plain torch: the fp32 weights are
    the master copy, bf16 autocast on CUDA, torch AdamW fused, no gradient buckets or all-reduce, clipping
    without a host sync; ZeRO-2 on one process partitions nothing and only adds its bucket copies), 2 on
    several (gradients and optimizer state partitioned: a replicated fp32 model costs 16 bytes/parameter per
    GPU); a resumed run keeps its checkpoint's stage. 0: that plain path on any number of processes
    (gradients all-reduced in buckets); 1: DeepSpeed bf16 with the optimizer state partitioned; 2: also the
    gradients; 3: also the weights."""
    compile: bool = field(default=False, metadata=_opt(OPTIM))
    """torch.compile the visual head and each LLM decoder layer (off by default: compiling takes minutes on
    a GPU, more on CPU, and it is measured per setup by bench/gpu_train_check.py)."""
    prefetch: bool = field(default=True, metadata=_opt(DATA, flag="--no-prefetch"))
    """(--no-prefetch) do not build the next micro-batch in a background thread while the device runs the
    current one (with --num-workers 0; on CUDA it is also pinned and copied without blocking)."""
    deepspeed: str | None = field(default=None, metadata=_opt(OPTIM))
    """DeepSpeed JSON config (batch sizes / accumulation / clipping come from our flags)."""
    max_steps: int | None = field(default=None, metadata=_opt(OPTIM))
    """Optimizer steps (default: --epochs over the data)."""
    epochs: float = field(default=1.0, metadata=_opt(OPTIM))
    """Passes over the data when --max-steps is not given."""
    micro_batch_size: int = field(default=1, metadata=_opt(OPTIM))
    """Packed rows per micro-batch per process."""
    grad_accum: int = field(default=1, metadata=_opt(OPTIM))
    """Micro-batches per optimizer step."""
    max_len: int = field(default=2048, metadata=_opt(OPTIM))
    """Tokens per packed row."""
    pack: bool = field(default=True, metadata=_opt(OPTIM, flag="--no-pack"))
    """(--no-pack) one sample per row, padded to the longest in the micro-batch."""
    lr: float | None = field(default=None, metadata=_opt(OPTIM))
    """Peak learning rate (default 1e-3 pretrain, 2e-5 sft, as LLaVA-1.5)."""
    weight_decay: float = field(default=0.0, metadata=_opt(OPTIM))
    """AdamW weight decay."""
    warmup_ratio: float = field(default=0.03, metadata=_opt(OPTIM))
    """Linear warmup share of the steps, then cosine."""
    min_lr_ratio: float = field(default=0.0, metadata=_opt(OPTIM))
    """Final learning rate as a share of the peak."""
    grad_clip: float = field(default=1.0, metadata=_opt(OPTIM))
    """Gradient norm clipping."""
    seed: int = field(default=0, metadata=_opt(OPTIM))
    """Seeds the projector/head init, the data order and packing."""
    # ------------------------------------------------------------------ data
    caption_free_ratio: float = field(default=0.0, metadata=_opt(DATA))
    """Share of caption-free shard rows (no conversation: visual loss only) in the mix; 1 = all."""
    skip_bad_samples: bool = field(default=False, metadata=_opt(DATA))
    """Skip (and list in RUN/bad_samples.jsonl) samples with missing images, keys absent from the shards
    or malformed conversations, instead of stopping."""
    num_workers: int = field(default=0, metadata=_opt(DATA))
    """DataLoader worker processes (0: collate in the training process)."""
    text_only_visual_loss: str = field(default="none", metadata=_opt(DATA, choices=TEXT_ONLY_VISUAL_LOSS))
    """none: text-only samples get no visual loss; grey-image: as the ASVR code, each adds the codes of LLaVA's
    grey dummy image as visual targets, predicted from zero hidden states (ablations; see docs/FIDELITY.md)."""
    # ------------------------------------------------------------------ checkpoints and logging
    save_every: int = field(default=0, metadata=_opt(RUN))
    """Checkpoint every N optimizer steps (0: by time only, --save-every-minutes)."""
    save_every_minutes: float = field(default=30.0, metadata=_opt(RUN, metavar="M"))
    """Also checkpoint when M minutes of wall time passed since the last checkpoint (0: off), so a
    preemption loses at most that; SIGTERM/SIGUSR1 save a checkpoint and stop (exit 128+signal)."""
    keep_checkpoints: int = field(default=2, metadata=_opt(RUN))
    """Newest checkpoints kept (0: all)."""
    final_checkpoint: bool = field(default=True, metadata=_opt(RUN, flag="--no-final-checkpoint"))
    """(--no-final-checkpoint) no checkpoint at the last step: throughput runs (a 1.3B SFT state with
    AdamW is ~20 GB)."""
    log_every: int = field(default=10, metadata=_opt(RUN, metavar="N"))
    """Read the step metrics off the device every N optimizer steps: one GPU sync per N steps, not per
    step; metrics.jsonl still gets every step (step time and tokens/s: the window's mean)."""
    resume: str | None = field(default=None, metadata=_opt(RUN))
    """'auto': continue from the newest checkpoint in --output-dir (if any); or a tag like step00000042."""
    overwrite: bool = field(default=False, metadata=_opt(RUN))
    """Start again in an --output-dir that already holds a run (its checkpoints, metrics, plot and export are
    deleted first; RUN/cache is kept). Without it, or --resume, such a folder is refused."""
    stop_after: int | None = field(default=None, metadata=_opt(RUN))
    """End this invocation after N steps with a checkpoint (the schedule still spans --max-steps; rerun
    with --resume auto): jobs with a wall-time limit."""
    tensorboard: bool = field(default=False, metadata=_opt(RUN))
    """Also log to RUN/tensorboard (needs tensorboard)."""
    export: bool = field(default=True, metadata=_opt(RUN, flag="--no-export"))
    """(--no-export) do not write RUN/final, the exported model."""
    progress: bool = field(default=True, metadata=_opt(RUN, flag="--quiet"))
    """(--quiet) no progress bar or messages."""
    verbose: bool = field(default=False, metadata=_opt(RUN))
    """Also show DeepSpeed's and transformers' own messages and warnings (see asvr.train.libraries)."""
    preview: int = field(default=0, metadata=_opt(RUN, metavar="N"))
    """Print the first N training samples as JSON lines (id, rendered text, input_ids, labels with -100, image
    positions) and exit without training (0: train)."""

    def __post_init__(self):
        if isinstance(self.head, dict):
            self.head = VisualHeadConfig(**self.head)
        self._check_model_options()
        self._check_checkpoint_options()
        self._check_counts()
        self._check_inputs()
        self.template = self.template or STAGE_DEFAULTS[self.stage]["template"]
        self.lr = STAGE_DEFAULTS[self.stage]["lr"] if self.lr is None else self.lr

    def _check_model_options(self) -> None:
        get_vision_input(self.vision_input).check_tower(self.vision_tower is not None)
        if self.vision_tower is None and (self.vision_tower_layer is not None or self.vision_tower_select != "patch"):
            raise ValueError("--vision-tower-layer and --vision-tower-select need --vision-tower")
        if self.stage not in STAGE_DEFAULTS:
            raise ValueError(f"--stage must be one of {STAGES}, got {self.stage!r}")
        self.zero = str(self.zero)  # a train_config.json from before "auto" holds an int
        if self.deepspeed is None and self.zero not in ZERO_STAGES:
            raise ValueError(f"--zero must be one of {ZERO_STAGES}, got {self.zero}")
        if self.template is not None and self.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {tuple(TEMPLATES)}, got {self.template!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"--attn-implementation must be one of {ATTN_IMPLEMENTATIONS}")

    def _check_checkpoint_options(self) -> None:
        if self.resume not in (None, "auto") and not self.resume.startswith("step"):
            raise ValueError("--resume takes 'auto' or a checkpoint tag like step00000042")
        if self.overwrite and self.resume is not None:
            raise ValueError("--overwrite starts the run again, --resume continues it: give one")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError("--stop-after must be >= 1")
        if self.stop_after is not None and not self.final_checkpoint:
            raise ValueError("--stop-after needs the final checkpoint (drop --no-final-checkpoint)")
        if self.log_every < 1:
            raise ValueError("--log-every must be >= 1")
        if self.save_every < 0 or self.save_every_minutes < 0:
            raise ValueError("--save-every and --save-every-minutes must be >= 0 (0: off)")

    def _check_counts(self) -> None:
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("--max-steps must be >= 1")
        if self.micro_batch_size < 1 or self.grad_accum < 1:
            raise ValueError("--micro-batch-size and --grad-accum must be >= 1")
        if self.text_only_visual_loss not in TEXT_ONLY_VISUAL_LOSS:
            raise ValueError(f"--text-only-visual-loss must be one of {TEXT_ONLY_VISUAL_LOSS}")
        if self.preview < 0:
            raise ValueError("--preview must be >= 0")

    def _check_inputs(self) -> None:
        """--codes and --data, or --packed (a single --data file given as a string becomes a list)."""
        if isinstance(self.data, str):
            self.data = [self.data]
        if self.packed is None and (self.codes is None or not self.data):
            raise ValueError("--codes and --data are required (or --packed DIR from asvr-pipeline pack)")
        if self.packed is not None and (self.codes is not None or self.data):
            raise ValueError("--packed replaces --codes and --data: give one or the other")

    # the components this run's flat options configure: built here only (the trainer and the preview)
    def model_config(self, vision_tower: VisionTowerSpec | None = None) -> ModelConfig:
        """The LVLM this run trains; ``vision_tower``: the loaded --vision-tower's spec (``build_model`` fills
        ``vision`` from the tokenizer)."""
        return ModelConfig(
            llm=self.model,
            trust_remote_code=self.trust_remote_code,
            vision_input=self.vision_input,
            vision_tower=vision_tower,
            head=self.head,
            visual_loss_weight=self.visual_loss_weight,
            attn_implementation=self.attn_implementation,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def data_config(self, image_tokens: int | None) -> DataConfig:
        """The training data of this run; ``image_tokens``: LLM positions per image (None: the shards' grid)."""
        from asvr.train.data.dataset import DataConfig
        from asvr.train.data.packing import PackingConfig

        assert self.codes is not None, "the in-memory path needs --codes (__post_init__: required without --packed)"
        return DataConfig(
            data=self.data,
            codes=self.codes,
            images=self.images,
            vision_input=self.vision_input,
            image_tokens=image_tokens,
            caption_free_ratio=self.caption_free_ratio,
            skip_bad_samples=self.skip_bad_samples,
            seed=self.seed,
            num_workers=self.num_workers,
            packing=PackingConfig(max_len=self.max_len, rows=self.micro_batch_size, pack=self.pack),
        )


__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DTYPES",
    "STAGES",
    "STAGE_DEFAULTS",
    "TEXT_ONLY_VISUAL_LOSS",
    "TOWER_SELECT",
    "ZERO_STAGES",
    "ModelConfig",
    "TrainConfig",
    "VisionSpec",
    "VisionTowerSpec",
    "VisualHeadConfig",
    "image_tokens",
    "tiny_llm_config",
]
