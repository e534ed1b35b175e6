"""Fine-tune pass: brief training of the compressed model, distilled from the original (teacher).

Loss with distillation: ``w * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * CE``,
where the cross-entropy term applies only when the data has labels (otherwise the loss is the
distillation term alone). The learning rate follows a cosine schedule to 0 after an optional warm-up.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from slimmer.data import split_batch
from slimmer.errors import CheckFailedError, DataError
from slimmer.passes import PassResult
from slimmer.recipe import FinetuneConfig

logger = logging.getLogger(__name__)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the softened distributions, scaled by ``T²`` so gradients keep their size."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay, nesterov=config.momentum > 0)


def _learning_rate_factor(step: int, total: int, config: FinetuneConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(total - config.warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def total_steps(config: FinetuneConfig, batches_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    assert config.epochs is not None
    return max(int(math.ceil(config.epochs * batches_per_epoch)), 1)


def finetune(model: nn.Module, config: FinetuneConfig, train_loader: DataLoader, teacher: nn.Module | None = None,
             inplace: bool = False, progress: bool = True) -> PassResult:
    """Train ``model`` for the step or epoch budget of ``config``; ``teacher`` enables distillation."""
    if not inplace:
        model = copy.deepcopy(model)
    if config.distill and teacher is None:
        raise ValueError("distillation needs the original model as teacher")
    if config.threads:
        torch.set_num_threads(config.threads)

    steps = total_steps(config, len(train_loader))
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, steps, config))
    if teacher is not None:
        teacher.eval()

    bar = _progress_bar(steps, progress)
    log_every = max(steps // 10, 1)
    losses: list[float] = []
    step = 0
    model.train()
    while step < steps:
        for batch in train_loader:
            if step >= steps:
                break
            loss = _training_step(model, teacher, batch, config, optimizer)
            scheduler.step()
            losses.append(loss)
            step += 1
            recent_loss = sum(losses[-20:]) / len(losses[-20:])
            bar.update(1)
            bar.set_postfix(loss=f"{recent_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if not progress and (step % log_every == 0 or step == steps):
                logger.info("Fine-tune step %d/%d: loss %.4f, lr %.2e", step, steps, recent_loss,
                            scheduler.get_last_lr()[0])
    bar.close()
    model.eval()

    result = PassResult("finetune", model)
    result.stats = {"steps": steps, "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}
    logger.info("Fine-tuned for %d steps: loss %.4f -> %.4f", steps, losses[0], result.stats["last_loss"])
    return result


def _training_step(model: nn.Module, teacher: nn.Module | None, batch: Any, config: FinetuneConfig,
                   optimizer: torch.optim.Optimizer) -> float:
    inputs, labels = split_batch(batch)
    logits = model(inputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise DataError("fine-tuning needs a classifier whose output is a (N, classes) tensor")

    if config.distill and teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        loss = distillation_loss(logits, teacher_logits, config.temperature)
        if labels is not None:
            loss = config.distill_weight * loss + (1.0 - config.distill_weight) * F.cross_entropy(logits, labels)
    elif labels is not None:
        loss = F.cross_entropy(logits, labels)
    else:
        raise DataError("fine-tuning without distillation needs labels in the training data")

    if not torch.isfinite(loss):
        raise CheckFailedError(f"fine-tuning diverged (loss {loss.item()}); lower finetune.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="fine-tune", unit="step", disable=not enabled, leave=False)
