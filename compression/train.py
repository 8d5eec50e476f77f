"""Fine-tuning a classifier on SST-2 with transformers' Trainer (the teacher, and the base of every student)."""

from __future__ import annotations

import logging
import sys
import tempfile
from dataclasses import dataclass, replace

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.trainer_callback import ProgressCallback

from compression import tempdirs
from compression.data import collator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by fine-tuning and distillation."""

    # Chosen on 2,000 whole sentences held out of train (benchmarks/teacher_sweep.py; README, "Teacher").
    learning_rate: float = 5e-5
    epochs: float = 5.0
    batch_size: int = 32
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    max_length: int = 128  # SST-2's longest validation sentence is 66 word pieces
    max_rows: int | None = None  # a slice of train (smoke profile); None = all of train
    seed: int = 42
    # bf16 autocast where the hardware computes in bf16 natively (AVX512-BF16/AMX CPUs, Ampere+ GPUs): about 2x
    # faster training on this machine's CPU; elsewhere fp32 (`resolve_precision`), so the cache key stays true.
    bf16: bool = True

    def __post_init__(self):
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")


def on_cpu(use_cpu: bool | None) -> bool:
    """`use_cpu`, or where it is None, whether there is no GPU to train on."""
    return use_cpu if use_cpu is not None else not torch.cuda.is_available()


def bf16_supported(use_cpu: bool) -> bool:
    """Whether bf16 autocast runs natively here (on emulated bf16 it is slower than fp32)."""
    if use_cpu:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(config: TrainConfig, use_cpu: bool | None = None) -> TrainConfig:
    """`config` with `bf16` switched off where this hardware lacks it (call before hashing it into a cache key)."""
    use_cpu = on_cpu(use_cpu)
    if config.bf16 and not bf16_supported(use_cpu):
        log.info("no native bf16 on this %s: training in fp32", "CPU" if use_cpu else "GPU")
        return replace(config, bf16=False)
    return config


def training_indices(n: int, config: TrainConfig) -> list[int] | None:
    """Positions of the rows a run trains on among `n`: None for all, else a seeded random slice of `max_rows`.

    The same slice as `datasets.Dataset.shuffle(seed).select(range(max_rows))`.
    """
    if config.max_rows is None or config.max_rows >= n:
        return None
    return np.random.default_rng(config.seed).permutation(n)[: config.max_rows].tolist()


def training_rows(train: datasets.Dataset, config: TrainConfig) -> datasets.Dataset:
    """The rows a run trains on: all of train, or a seeded random slice of `max_rows` (`training_indices`)."""
    index = training_indices(len(train), config)
    return train if index is None else train.select(index)


def device_options(use_cpu: bool) -> dict:
    """TrainingArguments for the device that change the recipe's arithmetic by rounding only.

    The fused AdamW (transformers' default from torch 2.8, pinned here so that a new default cannot change the
    recipe) updates every parameter in a few kernels, not several per tensor: what a launch-bound GPU step
    needs. On an Ampere or newer GPU, TF32 runs what bf16 autocast leaves in fp32 on tensor cores.
    """
    options = {"optim": "adamw_torch_fused"}
    if not use_cpu and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8:
        options["tf32"] = True
    return options


def training_arguments(
    config: TrainConfig, output_dir: str, use_cpu: bool | None = None, compile_step: bool = False
) -> TrainingArguments:
    """TrainingArguments for `config`: no checkpoints (the cache saves the result), length-grouped batches.

    `compile_step`: the Trainer compiles the model (`torch.compile`, inductor), fusing the step's element-wise
    kernels; rounding only, so it is not part of the recipe. Off by default: on this project's 2-core CPUs it
    gained under 1% per step after ~80 s of compiling; `benchmarks.train_speed --compile` measures it on a GPU.
    """
    use_cpu = on_cpu(use_cpu)
    return TrainingArguments(
        output_dir=output_dir,
        bf16=resolve_precision(config, use_cpu).bf16,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=config.warmup_ratio,  # a float < 1 is a ratio of the total steps
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        train_sampling_strategy="group_by_length",  # SST-2 phrases vary 3..60 tokens: padding is most of the cost
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        # the filter's per-step `isnan(loss) or isinf(loss)` makes the host wait for every GPU step; without it a
        # NaN loss is logged as NaN (training itself is the same either way)
        logging_nan_inf_filter=False,
        report_to="none",
        # the bar (stderr) even when transformers' logging is quieter than WARNING, as the CLI sets it: the
        # Trainer would otherwise print each loss report to stdout instead (`LoggedProgress` logs them)
        disable_tqdm=False,
        use_cpu=use_cpu,
        dataloader_num_workers=0,
        torch_compile=compile_step,
        **device_options(use_cpu),
    )


# Where stderr is a log file or a CI job's output, not a terminal, every redraw of the bar stays in it: once a
# minute there, not tqdm's every 0.1 s (a line's worth of bytes per training step)
LOG_FILE_BAR_INTERVAL_S = 60.0


class LoggedProgress(ProgressCallback):
    """transformers' progress bar (on stderr; redrawn once a minute where stderr is not a terminal), its loss
    reports sent to `logging`: the stock one writes them to stdout, where `compress run` prints its table."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        bar = self.training_bar
        if bar is not None and not getattr(bar.fp, "isatty", lambda: False)():
            bar.mininterval = bar.maxinterval = LOG_FILE_BAR_INTERVAL_S  # maxinterval: tqdm's monitor's forced redraws

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and log.isEnabledFor(logging.INFO):
            # the bar is cleared while the line is written and redrawn under it, not run into it
            with tqdm.external_write_mode(file=sys.stderr):
                log.info("step %d: %s", state.global_step, {k: v for k, v in logs.items() if k != "total_flos"})


def finetune(
    model: PreTrainedModel,
    tokenizer,
    train: datasets.Dataset,
    config: TrainConfig,
    trainer_class: type[Trainer] = Trainer,
    use_cpu: bool | None = None,
    compile_step: bool = False,
    **trainer_kwargs,
) -> PreTrainedModel:
    """Train `model` in place on tokenized `train` rows; returns it in eval mode.

    `use_cpu`: train on the CPU even where a GPU is (None: on the GPU if there is one). `compile_step`: see
    `training_arguments`. `trainer_class` / `trainer_kwargs` let distillation reuse this with its own loss.
    """
    tempdirs.sweep_tmp("compression-trainer")  # the Trainer folders of runs that were killed
    with tempfile.TemporaryDirectory(prefix=tempdirs.prefix("compression-trainer")) as tmp:
        trainer = trainer_class(
            model=model,
            args=training_arguments(config, tmp, use_cpu, compile_step),
            train_dataset=train,
            data_collator=collator(tokenizer),
            processing_class=tokenizer,
            **trainer_kwargs,
        )
        trainer.pop_callback(ProgressCallback)
        trainer.add_callback(LoggedProgress)
        try:
            result = trainer.train()
        finally:  # also when training fails or is interrupted: the caller keeps the model
            # bf16 training leaves accelerate's autocast wrapper on `model.forward`: without this the model would
            # go on computing in bf16 (and fail to export to ONNX) until reloaded
            trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
            model.eval()
    log.info("trained %s rows in %.0f s (loss %.4f)", len(train), result.metrics["train_runtime"], result.training_loss)
    return model.eval()
