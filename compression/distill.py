"""Knowledge distillation: a shallower student copied from the teacher learns the teacher's soft targets.

Student (DistilBERT-style): the teacher's embeddings, classifier and an evenly spaced subset of its layers with
their weights. Loss (Hinton et al. 2015; Sanh et al. 2019):

    loss = alpha * T² * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y) [+ beta * hidden MSE]

The T² factor keeps the soft-target gradients' magnitude independent of T: as T grows the KD term tends to
the mean squared difference of the centred logits / 2 (per class, averaged over the batch).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer

from compression.train import TrainConfig, finetune

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """What the student is and how it learns (optimisation itself is a train.TrainConfig)."""

    num_layers: int = 3  # every other layer of the 6-layer default base
    temperature: float = 2.0  # softens the teacher's distribution; SST-2 teachers are very confident
    alpha: float = 0.5  # weight of the soft-target term; 1 - alpha goes to the labels
    hidden_weight: float = 0.0  # optional MSE between student layers and their mapped teacher layers

    def __post_init__(self):
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.hidden_weight < 0:
            raise ValueError(f"hidden_weight must be >= 0, got {self.hidden_weight}")


def layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Teacher layer index copied into each student layer: evenly spaced from 0 (6 -> 3 gives [0, 2, 4])."""
    if student_layers > teacher_layers:
        raise ValueError(f"a student of {student_layers} layers cannot come from a teacher of {teacher_layers}")
    if student_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {student_layers}")
    return [i * teacher_layers // student_layers for i in range(student_layers)]


def _encoder(model: PreTrainedModel) -> torch.nn.Module:
    base = getattr(model, model.base_model_prefix)
    return base.encoder


def make_student(teacher: PreTrainedModel, num_layers: int) -> PreTrainedModel:
    """A deep copy of `teacher` keeping `layer_map(...)` of its encoder layers, with their weights."""
    mapping = layer_map(teacher.config.num_hidden_layers, num_layers)
    student = copy.deepcopy(teacher)
    encoder = _encoder(student)
    encoder.layer = torch.nn.ModuleList(encoder.layer[i] for i in mapping)
    for new_index, layer in enumerate(encoder.layer):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.config.num_hidden_layers = num_layers
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


class DistillTrainer(Trainer):
    """A Trainer whose loss is `distillation_loss` against a frozen teacher run without gradients."""

    def __init__(self, *args, teacher: PreTrainedModel, distill: DistillConfig, mapping: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().to(self.args.device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.distill = distill
        self.mapping = mapping

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        want_hidden = self.distill.hidden_weight > 0
        outputs = model(**inputs, output_hidden_states=want_hidden)
        # The frozen teacher runs in the student's precision (bf16 autocast when training in bf16); the losses
        # are taken in fp32.
        with torch.no_grad(), torch.autocast(self.args.device.type, torch.bfloat16, enabled=self.args.bf16):
            teacher_out = self.teacher(**inputs, output_hidden_states=want_hidden)
        loss = distillation_loss(
            outputs.logits.float(), teacher_out.logits.float(), labels, self.distill.temperature, self.distill.alpha
        )
        if want_hidden:
            loss = loss + self.distill.hidden_weight * hidden_loss(
                [h.float() for h in outputs.hidden_states], [h.float() for h in teacher_out.hidden_states],
                self.mapping, inputs["attention_mask"],
            )
        return (loss, outputs) if return_outputs else loss


def distill(
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer,
    train,
    distill_config: DistillConfig,
    train_config: TrainConfig,
) -> PreTrainedModel:
    """Train `student` in place on tokenized `train` rows against `teacher`; returns it in eval mode.

    `student` is usually `make_student(teacher, n)`, or a pruned student being recovered.
    """
    mapping = layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    return finetune(
        student,
        tokenizer,
        train,
        train_config,
        trainer_class=DistillTrainer,
        teacher=teacher,
        distill=distill_config,
        mapping=mapping,
    )
