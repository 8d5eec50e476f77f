"""Knowledge distillation: a student learns a fine-tuned teacher's soft targets.

The student is either cut from the teacher (DistilBERT-style: its embeddings, classifier and an evenly spaced
subset of its layers, with their weights; `make_student`) or another model altogether, with its own tokenizer.
The teacher's logits over the training rows are computed once (`teacher_outputs`) and travel with the student's
rows as a `teacher_logits` column, so each model reads the sentences through its own tokenizer and no teacher
forward runs per student epoch. Loss (Hinton et al. 2015; Sanh et al. 2019):

    loss = alpha * T² * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)
           [+ beta * hidden MSE] [+ gamma * (1 - cos(W s_pooled, t_pooled))]

The T² factor keeps the soft-target gradients' magnitude independent of T: as T grows the KD term tends to
the mean squared difference of the centred logits / 2 (per class, averaged over the batch).

Two logits carry one number per sentence (the margin). The optional feature term (gamma, `feature_weight`) also
asks the student's pooled sentence vector, through a learned projection W [Ds -> Dt] that is dropped after
training, to point where the teacher's does: hundreds of numbers per sentence, cached once like the logits
(`teacher_outputs`), so it works across models, widths and tokenizers (FitNets' hint, on the pooled vector).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import datasets
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer

from compression.cache import OMIT_DEFAULT
from compression.data import batches
from compression.measure import model_device
from compression.models import (
    encoder_layers,
    evaluating,
    masked_mean,
    restore_modes,
    training_modes,
)
from compression.train import TrainConfig, finetune

LOGITS_COLUMN = "teacher_logits"
FEATURE_ROW = "feature_row"  # each row's index into the teacher's cached pooled vectors ([N, Dt]); -1: none
PROJECTION = "feature_projection"  # the student's submodule while it trains with the feature term

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """What the student is and how it learns (optimisation itself is a train.TrainConfig)."""

    num_layers: int = 3  # every other layer of the 6-layer default base
    temperature: float = 2.0  # softens the teacher's distribution; SST-2 teachers are very confident
    alpha: float = 0.5  # weight of the soft-target term; 1 - alpha goes to the labels
    hidden_weight: float = 0.0  # optional MSE between student layers and their mapped teacher layers
    # optional cosine distance of the projected pooled vector to the teacher's (left out of cache keys at 0)
    feature_weight: float = field(default=0.0, metadata={OMIT_DEFAULT: True})

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")
        if not self.feature_weight >= 0:
            raise ValueError(f"feature_weight must be >= 0, got {self.feature_weight}")


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer index copied into each student layer: evenly spaced from 0 (6 -> 3 gives [0, 2, 4])."""
    if student_layers > teacher_layers:
        raise ValueError(f"a student of {student_layers} layers cannot come from a teacher of {teacher_layers}")
    if student_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {student_layers}")
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def make_student(teacher: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A deep copy of `teacher` keeping `layer_map(...)` of its encoder layers, with their weights.

    BERT, RoBERTa, MPNet (its shared relative-position bias table stays whole) and DistilBERT; another family is
    a ValueError naming these.
    """
    encoder_layers(teacher, "cutting a student from the teacher")  # refuse before the deep copy
    cut = [key for key in ("kept_heads", "kept_neurons", "embedding_rank") if getattr(teacher.config, key, None)]
    if cut:  # its per-layer records would not follow the layers kept
        raise ValueError(f"cutting a student needs an unpruned teacher; this one has {', '.join(cut)} set "
                         "(cut the student first, then prune it)")
    mapping = layer_map(teacher.config.num_hidden_layers, num_layers)
    student = copy.deepcopy(teacher)
    parent, name, _ = encoder_layers(student, "cutting a student from the teacher")
    setattr(parent, name, torch.nn.ModuleList(getattr(parent, name)[i] for i in mapping))
    for new_index, layer in enumerate(getattr(parent, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.config.num_hidden_layers = num_layers  # DistilBERT's config maps this name to n_layers
    return student


def distillation_loss(
    student_logits: torch.Tensor,  # [B, C]
    teacher_logits: torch.Tensor,  # [B, C]
    labels: torch.Tensor,  # [B] class indices
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """alpha * T² * KL(teacher_T || student_T) + (1 - alpha) * CE(student, labels); a scalar, >= 0."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    soft_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    kd = F.kl_div(soft_student, soft_teacher, reduction="batchmean", log_target=True) * temperature**2
    if alpha == 1.0:
        return kd
    return alpha * kd + (1.0 - alpha) * F.cross_entropy(student_logits, labels)


def hidden_loss(
    student_hidden: tuple[torch.Tensor, ...],  # num_layers + 1 of [B, T, D]; index 0 is the embeddings
    teacher_hidden: tuple[torch.Tensor, ...],
    mapping: list[int],
    attention_mask: torch.Tensor,  # [B, T]
) -> torch.Tensor:
    """Mean squared error between each student layer's output and its teacher layer's, over real tokens."""
    mask = attention_mask.unsqueeze(-1).to(student_hidden[0].dtype)
    total = student_hidden[0].new_zeros(())
    for s_index, t_index in enumerate(mapping, start=1):
        diff = (student_hidden[s_index] - teacher_hidden[t_index + 1]) ** 2 * mask
        total = total + diff.sum() / (mask.sum() * diff.shape[-1])
    return total / len(mapping)


def feature_loss(
    student_pooled: torch.Tensor,  # [B, Ds]
    teacher_pooled: torch.Tensor,  # [B, Dt]
    projection: torch.nn.Module,  # [Ds] -> [Dt]
    present: torch.Tensor | None = None,  # [B] bool: rows that have a teacher vector (None: all)
) -> torch.Tensor:
    """Mean cosine distance 1 - cos(projection(s), t) over the present rows; a scalar in [0, 2] (0 if none).

    Cosine, not MSE: the two models' vectors differ in scale, and a scale-free term keeps `feature_weight`
    comparable across teachers."""
    if present is not None:
        student_pooled, teacher_pooled = student_pooled[present], teacher_pooled[present]
    if len(student_pooled) == 0:
        return student_pooled.new_zeros(()) + 0.0 * sum(p.sum() for p in projection.parameters())
    cos = F.cosine_similarity(projection(student_pooled), teacher_pooled, dim=-1)  # [B]
    return (1.0 - cos).mean()


@torch.inference_mode()
def teacher_outputs(
    model: PreTrainedModel, ds: datasets.Dataset, tokenizer, batch_size: int = 128, bf16: bool = False,
    features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(logits [N, C], pooled [N, H] or None) of `model` over a tokenized split, in the split's order (fp32, CPU).

    `pooled` (with `features`) is the attention-masked mean of the last hidden states, what a mean-pooled
    classifier reads. Length-sorted batches keep padding small; bf16 autocast matches a teacher trained in bf16.
    """
    device = next(model.parameters()).device
    logits_out = pooled_out = None
    with evaluating(model):  # handed back in the mode it came in
        for batch in batches(ds, tokenizer, batch_size):
            index = batch.pop("index")
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                out = model(**inputs, output_hidden_states=features)
            logits = out.logits.float().cpu()  # [B, C]
            if logits_out is None:
                logits_out = torch.empty(len(ds), logits.shape[1])
            logits_out[index] = logits
            if features:
                pooled = masked_mean(out.hidden_states[-1].float(), inputs["attention_mask"]).cpu()  # [B, H]
                if pooled_out is None:
                    pooled_out = torch.empty(len(ds), pooled.shape[1])
                pooled_out[index] = pooled
    return logits_out, pooled_out


def with_teacher_logits(ds: datasets.Dataset, logits: torch.Tensor) -> datasets.Dataset:
    """`ds` (a student's tokenized rows) with a `teacher_logits` column: row i gets logits[i] [C]."""
    if logits.dim() != 2 or logits.shape[0] != len(ds):
        raise ValueError(f"teacher logits have shape {tuple(logits.shape)}, expected ({len(ds)}, classes)")
    if not torch.isfinite(logits).all():
        raise ValueError("teacher logits contain NaN or infinity")
    if LOGITS_COLUMN in ds.column_names:
        ds = ds.remove_columns(LOGITS_COLUMN)
    return ds.add_column(LOGITS_COLUMN, logits.tolist())


def with_feature_rows(ds: datasets.Dataset, rows: list[int] | None = None) -> datasets.Dataset:
    """`ds` with a `feature_row` column: row i indexes the teacher's pooled vectors at rows[i] (default: i; -1
    marks a row without one)."""
    rows = list(range(len(ds))) if rows is None else list(rows)
    if len(rows) != len(ds):
        raise ValueError(f"{len(rows)} feature rows for {len(ds)} rows")
    if FEATURE_ROW in ds.column_names:
        ds = ds.remove_columns(FEATURE_ROW)
    return ds.add_column(FEATURE_ROW, rows)


class DistillTrainer(Trainer):
    """A Trainer whose loss is `distillation_loss` against the teacher's logits.

    The logits come with each batch (`teacher_logits` column); a live teacher is needed only for the hidden-state
    loss (`hidden_weight` > 0), which also needs the student to read the teacher's tokenization.
    """

    def __init__(self, *args, teacher: PreTrainedModel | None, distill: DistillConfig, mapping: list[int] | None,
                 features: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.features = features  # [N, Dt] the teacher's pooled vectors, indexed by each row's FEATURE_ROW
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.eval().to(self.args.device)
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.distill = distill
        self.mapping = mapping

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for column in (LOGITS_COLUMN, FEATURE_ROW):  # not forward arguments, but the loss needs them
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        given = inputs.pop(LOGITS_COLUMN, None)
        rows = inputs.pop(FEATURE_ROW, None)  # [B]
        want_hidden = self.distill.hidden_weight > 0
        want_features = self.distill.feature_weight > 0
        outputs = model(**inputs, output_hidden_states=want_hidden or want_features)
        teacher_out = None
        if given is None or want_hidden:
            if self.teacher is None:
                raise ValueError("distillation needs a teacher model or a teacher_logits column")
            # The frozen teacher runs in the student's precision (bf16 autocast when training in bf16); the
            # losses are taken in fp32.
            with torch.no_grad(), torch.autocast(self.args.device.type, torch.bfloat16, enabled=self.args.bf16):
                teacher_out = self.teacher(**inputs, output_hidden_states=want_hidden)
        target = given if given is not None else teacher_out.logits
        loss = distillation_loss(
            outputs.logits.float(), target.float(), labels, self.distill.temperature, self.distill.alpha
        )
        if want_hidden:
            loss = loss + self.distill.hidden_weight * hidden_loss(
                [h.float() for h in outputs.hidden_states], [h.float() for h in teacher_out.hidden_states],
                self.mapping, inputs["attention_mask"],
            )
        if want_features:
            if rows is None or self.features is None:
                raise ValueError(f"feature_weight > 0 needs rows with a {FEATURE_ROW} column and the teacher's vectors")
            target = self.features[rows.clamp(min=0).cpu()].to(outputs.logits.device).float()  # [B, Dt]
            pooled = masked_mean(outputs.hidden_states[-1].float(), inputs["attention_mask"])  # [B, Ds]
            loss = loss + self.distill.feature_weight * feature_loss(
                pooled, target, getattr(model, PROJECTION), rows >= 0
            )
        return (loss, outputs) if return_outputs else loss


def distill(
    teacher: PreTrainedModel | None,
    student: PreTrainedModel,
    tokenizer,
    train: datasets.Dataset,
    distill_config: DistillConfig,
    train_config: TrainConfig,
    callbacks: list | None = None,
    features: torch.Tensor | None = None,
    use_cpu: bool | None = None,
) -> PreTrainedModel:
    """Train `student` in place on its tokenized `train` rows; returns it in eval mode (`use_cpu`: as `finetune`).

    The soft targets are `train`'s `teacher_logits` column when it has one (`with_teacher_logits`), else the live
    `teacher`'s logits on the same inputs. `student` may be `make_student(teacher, n)`, a pruned student being
    recovered, or another model with its own tokenizer (then `train` must carry the logits). With
    `feature_weight` > 0, `features` [N, Dt] are the teacher's pooled vectors and `train`'s `feature_row` column
    indexes them (`with_feature_rows`); the projection learnt beside the student is not part of it afterwards.
    """
    if teacher is None and LOGITS_COLUMN not in train.column_names:
        raise ValueError("distill needs a teacher model or rows with a teacher_logits column")
    classes = len(train[0][LOGITS_COLUMN]) if LOGITS_COLUMN in train.column_names and len(train) else None
    if classes is not None and classes != student.config.num_labels:
        raise ValueError(f"the rows' teacher logits have {classes} classes; the student has "
                         f"{student.config.num_labels}")
    if distill_config.feature_weight > 0:
        if features is None or features.dim() != 2 or FEATURE_ROW not in train.column_names:
            raise ValueError(f"feature_weight > 0 needs the teacher's vectors [N, D] and a {FEATURE_ROW} column")
        used = torch.tensor(sorted(set(train[FEATURE_ROW]) - {-1}), dtype=torch.long)
        if len(used) and not (used.min() >= 0 and used.max() < len(features)):
            raise ValueError(f"{FEATURE_ROW} indexes outside the teacher's {len(features):,} vectors")
        if not torch.isfinite(features[used]).all():  # rows no stage reads may be NaN (the pipeline's cache)
            raise ValueError("the teacher's pooled vectors the rows read contain NaN or infinity")
    mapping = None
    if distill_config.hidden_weight > 0:
        if teacher is None:
            raise ValueError("hidden_weight > 0 needs the live teacher (and the teacher's tokenization)")
        mapping = layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    if distill_config.feature_weight > 0:
        # a submodule while training, so the Trainer's optimizer and device placement take it along
        student.add_module(PROJECTION, torch.nn.Linear(student.config.hidden_size, features.shape[1]))
    # the Trainer moves a live teacher to its device, in eval mode and frozen: the caller gets it back as it was
    teacher_state = None if teacher is None else (
        training_modes(teacher), model_device(teacher), [p.requires_grad for p in teacher.parameters()])
    try:
        return finetune(
            student,
            tokenizer,
            train,
            train_config,
            trainer_class=DistillTrainer,
            use_cpu=use_cpu,
            teacher=teacher if mapping is not None or LOGITS_COLUMN not in train.column_names else None,
            distill=distill_config,
            mapping=mapping,
            features=features if distill_config.feature_weight > 0 else None,
            callbacks=callbacks,  # transformers TrainerCallbacks, e.g. a sweep's per-epoch evaluation
        )
    finally:
        if hasattr(student, PROJECTION):
            delattr(student, PROJECTION)
        if teacher_state is not None:
            modes, device, grads = teacher_state
            restore_modes(modes)
            teacher.to(device)
            for p, grad in zip(teacher.parameters(), grads):
                p.requires_grad_(grad)
