"""Fine-tune pass: brief training of the compressed model, distilled from the original (teacher).

Loss with distillation: ``w * T² * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * CE``,
where the cross-entropy term applies only when the data has labels (otherwise the loss is the
distillation term alone). The learning rate follows a cosine schedule to 0 after an optional warm-up.

With ``on_checkpoint``, the training state (:class:`FinetuneState`) is handed over at the start,
every ``checkpoint_every`` steps, at the end and when Ctrl-C stops the run between two steps.
``resume_from`` continues from such a state with the same data order, random numbers, optimizer
and learning-rate schedule, so the weights come out as they would without the interruption.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from slimmer.checkpoint import capture_rng_states, restore_rng_states
from slimmer.data import split_batch
from slimmer.errors import CheckFailedError, DataError, FinetuneInterrupted, InputError
from slimmer.passes import PassResult
from slimmer.recipe import FinetuneConfig

logger = logging.getLogger(__name__)

# Fine-tuning counts as diverged when the mean loss of the last DIVERGENCE_WINDOW steps (fewer in
# the first steps, never counting the first) exceeds DIVERGENCE_FACTOR times both the first loss and
# ln(classes), the cross-entropy of a uniform guess. The first loss comes before any update, so no
# learning rate can inflate it: with lr=1e6 on the digits demo, the second loss is already 5e11.
# The window ignores single spikes such as the small last batch of an epoch (up to 10x the first
# loss on the digits demo). The ln(classes) floor keeps a loss that starts near 0 from tripping
# on a small rise. With the shipped recipes the window mean peaked at 1.02x the first loss (digits
# demo, all 66 steps) and 1.00x (resnet20-half-macs, first 200 steps), under 0.09 of the threshold.
DIVERGENCE_WINDOW = 20
DIVERGENCE_FACTOR = 10.0


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


@dataclass
class FinetuneState:
    """The state of a fine-tune run after ``step`` optimizer steps, enough to continue it exactly."""

    step: int
    total_steps: int
    epoch: int
    batches_done: int  # batches of epoch ``epoch`` already trained on
    epoch_start_rng: torch.Tensor  # state of the generator that shuffles the data, as the epoch began
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    losses: list[float]
    rng: dict[str, Any]  # global random number generator states after the step

    def to_dict(self) -> dict[str, Any]:
        return {item.name: getattr(self, item.name) for item in fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneState:
        return cls(**{item.name: data[item.name] for item in fields(cls)})


CheckpointCallback = Callable[[nn.Module, FinetuneState], None]


def finetune(model: nn.Module, config: FinetuneConfig, train_loader: DataLoader, teacher: nn.Module | None = None,
             inplace: bool = False, progress: bool = True, resume_from: FinetuneState | None = None,
             on_checkpoint: CheckpointCallback | None = None) -> PassResult:
    """Train ``model`` for the step or epoch budget of ``config``; ``teacher`` enables distillation.

    ``on_checkpoint(model, state)`` receives each state to save (see the module docstring). While it
    is set, the first Ctrl-C stops the run after the current step and raises
    :class:`~slimmer.errors.FinetuneInterrupted`. ``resume_from`` is a state saved that way, for the
    same model structure, config and ``train_loader``.
    """
    if not inplace:
        model = copy.deepcopy(model)
    if config.distill and teacher is None:
        raise ValueError("distillation needs the original model as teacher")
    if config.threads:
        torch.set_num_threads(config.threads)

    steps = total_steps(config, len(train_loader))
    optimizer = _optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _learning_rate_factor(step, steps, config))
    if resume_from is not None:
        _load_training_state(resume_from, steps, len(train_loader), optimizer, scheduler)
        state = resume_from
        logger.info("Resuming fine-tuning after step %d of %d", state.step, steps)
    else:
        state = FinetuneState(0, steps, 0, 0, _shuffle_rng_state(train_loader), {}, {}, [], {})
    if teacher is not None:
        teacher.eval()

    def save_checkpoint() -> None:
        if on_checkpoint is not None:
            state.optimizer = optimizer.state_dict()
            state.scheduler = scheduler.state_dict()
            state.rng = capture_rng_states()
            on_checkpoint(model, state)

    if resume_from is None:
        save_checkpoint()
    bar = _progress_bar(steps, progress, initial=state.step)
    log_every = max(steps // 10, 1)
    model.train()
    saved_step = state.step if on_checkpoint is not None else None
    with _stop_on_first_interrupt(enabled=on_checkpoint is not None) as stop_requested:
        batches = _batches_from(train_loader, state, steps, resuming=resume_from is not None)
        while not stop_requested():
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                # A terminal's Ctrl-C also reaches the DataLoader's worker processes, which exit, so the
                # fetch can fail. The training state is still the one after the last finished step.
                if stop_requested():
                    logger.debug("Fetching a batch failed after the interrupt", exc_info=True)
                    break
                raise
            loss, classes = _training_step(model, teacher, batch, config, optimizer)
            scheduler.step()
            state.losses.append(loss)
            state.step += 1
            _check_not_diverging(state.losses, classes, config)
            state.batches_done += 1
            recent_loss = sum(state.losses[-20:]) / len(state.losses[-20:])
            bar.update(1)
            bar.set_postfix(loss=f"{recent_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if not progress and (state.step % log_every == 0 or state.step == steps):
                logger.info("Fine-tune step %d/%d: loss %.4f, lr %.2e", state.step, steps, recent_loss,
                            scheduler.get_last_lr()[0])
            if state.step % config.checkpoint_every == 0 or state.step == steps:
                save_checkpoint()
                saved_step = state.step
        if stop_requested():
            if saved_step != state.step:
                save_checkpoint()
            bar.close()
            raise FinetuneInterrupted(state.step, steps)
    bar.close()
    model.eval()

    result = PassResult("finetune", model)
    losses = state.losses
    result.stats = {"steps": steps, "first_loss": losses[0], "last_loss": sum(losses[-20:]) / len(losses[-20:])}
    logger.info("Fine-tuned for %d steps: loss %.4f -> %.4f", steps, losses[0], result.stats["last_loss"])
    return result


def _check_not_diverging(losses: list[float], classes: int, config: FinetuneConfig) -> None:
    """Raise CheckFailedError when the recent losses have grown far past the first one (see DIVERGENCE_FACTOR)."""
    window = losses[1:][-DIVERGENCE_WINDOW:]
    if not window:
        return
    recent = sum(window) / len(window)
    if recent > DIVERGENCE_FACTOR * max(losses[0], math.log(classes)):
        first_step = len(losses) - len(window) + 1
        steps = f"step {first_step}" if first_step == len(losses) else f"steps {first_step} to {len(losses)}"
        raise CheckFailedError(f"fine-tuning diverged: the mean loss of {steps} is {recent:.4g}, over "
                               f"{DIVERGENCE_FACTOR:g} times the loss before the first update ({losses[0]:.4g}); "
                               f"lower finetune.lr (now {config.lr:g})")


def _shuffle_rng_state(loader: DataLoader) -> torch.Tensor:
    """State of the generator that orders the data: the loader's own, else torch's global one."""
    if loader.generator is not None:
        return loader.generator.get_state()
    return torch.get_rng_state()


def _set_shuffle_rng_state(loader: DataLoader, rng_state: torch.Tensor) -> None:
    if loader.generator is not None:
        loader.generator.set_state(rng_state)
    else:
        torch.set_rng_state(rng_state)


def _load_training_state(state: FinetuneState, steps: int, batches_per_epoch: int,
                         optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    if state.total_steps != steps or state.batches_done > batches_per_epoch:
        raise InputError(f"cannot resume fine-tuning: the checkpoint was made for {state.total_steps} steps with at "
                         f"least {state.batches_done} batches an epoch, but the training data now gives {steps} steps "
                         f"and {batches_per_epoch} batches an epoch; the training data changed since the checkpoint "
                         "was saved")
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)


def _batches_from(loader: DataLoader, state: FinetuneState, steps: int, resuming: bool) -> Iterator[Any]:
    """Yield the batches for the steps after ``state.step``, epoch after epoch; keep the epoch fields of ``state``.

    When ``resuming``, the saved epoch starts again from its shuffle state and the batches already
    trained on are loaded again and dropped, so that data order and random transforms continue as
    they would have. Then the global random states are set to the checkpoint's.
    """
    skip = state.batches_done if resuming and state.step < steps else 0
    if resuming and not skip:
        restore_rng_states(state.rng)
    while state.step < steps:
        _set_shuffle_rng_state(loader, state.epoch_start_rng)
        batches = iter(loader)
        if skip:
            for _ in range(skip):
                next(batches)
            restore_rng_states(state.rng)
            skip = 0
        for batch in batches:
            yield batch
            if state.step >= steps:
                return
        state.epoch += 1
        state.batches_done = 0
        state.epoch_start_rng = _shuffle_rng_state(loader)


@contextlib.contextmanager
def _stop_on_first_interrupt(enabled: bool) -> Iterator[Callable[[], bool]]:
    """Turn the first SIGINT into a request to stop after the current step; a second one interrupts at once.

    Only in the main thread, and only where SIGINT still has Python's default handler.
    """
    requested = threading.Event()
    if (not enabled or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield requested.is_set
        return

    def request_stop(signal_number: int, frame: Any) -> None:
        requested.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        logger.warning("Interrupt received: saving a checkpoint after the current step (Ctrl-C again stops at once)")

    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield requested.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def _training_step(model: nn.Module, teacher: nn.Module | None, batch: Any, config: FinetuneConfig,
                   optimizer: torch.optim.Optimizer) -> tuple[float, int]:
    """Train on one batch; return the loss and the number of classes the model outputs."""
    inputs, labels = split_batch(batch)
    logits = model(inputs)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise DataError("fine-tuning needs a classifier whose output is a (N, classes) tensor")
    class_indices = labels is not None and labels.dim() == 1 and not labels.is_floating_point() and len(labels)
    if class_indices and not 0 <= int(labels.min()) <= int(labels.max()) < logits.shape[1]:
        raise DataError(f"data.train has labels from {int(labels.min())} to {int(labels.max())}, but the model "
                        f"outputs {logits.shape[1]} classes; check the class folders or the model's class count")

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
    return float(loss.item()), logits.shape[1]


def _progress_bar(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="fine-tune", unit="step", disable=not enabled, leave=False)
