"""``repair``: a short distillation of a transformed model's changed projections toward the original model.

A training-free conversion (``gqa``) changes some attention projections; ``repair`` fits only those to the
original model, which it treats as the teacher, in two stages (see ``docs/methods.md``, "Model transforms"):

1. **Layer-wise.** Each changed layer's attention is fitted, on the teacher's own inputs to that layer, to the
   teacher's attention output at that layer (relative squared error). Layers are independent, so this stage
   is cheap and repairs each conversion where it happened.
2. **Whole model.** All changed projections together are fitted so that the student's next-token distribution
   matches the teacher's (KL divergence, teacher first), which also corrects the errors the layers pass on to
   one another.

Nothing else of the model is trained: the embeddings, norms, MLPs and unchanged projections keep their
values exactly. The data are, by default, the teacher's own samples continuing short seeds of the
calibration text (``data='generated'``), or a calibration source read as it is. Matmuls run in bfloat16
autocast (fp32 master weights) where the hardware multiplies bf16 natively (a GPU, a CPU with AMX or
AVX512-BF16), which is what makes the stage fit in minutes on such a CPU; elsewhere they stay float32, since
emulated bf16 is tens of times slower (``kvstack.hardware``).

``minutes`` bounds the whole repair in wall-clock time, its data included: the whole-model stage times its
first steps and runs as many as fit before the deadline (at most ``steps``), with the learning-rate schedule
laid over that number, so a time-bounded repair still anneals; the record says how many it ran.

Shapes: ``N`` sequences of ``T`` tokens, ``h`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, ClassVar

from kvstack.hardware import fast_bf16
from kvstack.lazy_import import lazy_module
from kvstack.spec import SpecError, register
from kvstack.transforms.base import Transform, TransformError, attention_layers

torch = lazy_module("torch")

__all__ = ["Repair", "repair_data"]

SEED_TOKENS = 16  # tokens of calibration text each generated sequence continues
HELD_OUT = 4  # sequences kept out of training, on which the record's before/after losses are measured
WARMUP = 10  # steps of linear warm-up before the cosine decay
TIMED_STEPS = 3  # whole-model steps timed before a time-bounded repair fixes its step count (< WARMUP)


def say(message: str) -> None:
    """One progress line on stderr (as the model store's; kept here so importing transforms imports no torch)."""
    print(f"kvstack: {message}", file=sys.stderr, flush=True)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SpecError(f"{name} must be an integer >= {minimum}, got {value!r}")


@register(
    "repair",
    category="model/repair",
    description=(
        "Model transform step, after a transform (gqa(...) + repair()): distils only the changed attention "
        "projections toward the original model, layer by layer then on its next-token distribution."
    ),
)
@dataclasses.dataclass
class Repair(Transform):
    """Fit the projections a preceding transform changed to the original model (see the module docstring).

    Parameters
    ----------
    local_steps:
        Optimiser steps per changed layer in the layer-wise stage (0 skips it).
    steps:
        Optimiser steps of the whole-model stage (0 skips it).
    sequences:
        Training sequences (``HELD_OUT`` more are generated or read for the record's held-out losses).
    length:
        Tokens per sequence.
    batch:
        Sequences per step.
    lr:
        Peak Adam learning rate (linear warm-up, cosine decay to zero).
    data:
        ``'generated'`` (the original model's samples continuing calibration-text seeds) or a calibration
        source (a name in ``kvstack.calibration.SOURCES`` or a text file) read as it is.
    seed:
        Seed of the sampling and of the batch order.
    minutes:
        Wall-clock bound of the whole repair, data included (0: none). The whole-model stage runs as many of
        its ``steps`` as fit; a layer-wise stage that reaches the deadline leaves its remaining layers as the
        transform made them.
    """

    local_steps: int = 150
    steps: int = 150
    sequences: int = 64
    length: int = 512
    batch: int = 4
    lr: float = 2e-4
    data: str = "generated"
    seed: int = 0
    minutes: float = 0.0

    is_repair: ClassVar[bool] = True

    def __post_init__(self) -> None:
        _positive_int("local_steps", self.local_steps, 0)
        _positive_int("steps", self.steps, 0)
        _positive_int("sequences", self.sequences)
        _positive_int("length", self.length, SEED_TOKENS + 1)
        _positive_int("batch", self.batch)
        _positive_int("seed", self.seed, 0)
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not 0 < self.lr < 1:
            raise SpecError(f"lr must be a learning rate in (0, 1), got {self.lr!r}")
        if not isinstance(self.data, str) or not self.data:
            raise SpecError(f"data must be 'generated' or a calibration source, got {self.data!r}")
        if (isinstance(self.minutes, bool) or not isinstance(self.minutes, (int, float))
                or not 0 <= self.minutes < 24 * 60):
            raise SpecError(f"minutes must be a time bound in [0, 1440) (0: none), got {self.minutes!r}")
        if self.local_steps == 0 and self.steps == 0:
            raise SpecError("repair with local_steps=0 and steps=0 trains nothing; give one of them")

    def check(self, model: Any) -> None:
        """Nothing to refuse beyond the architecture check the transform already made."""

    def fit(self, student: Any, teacher: Any, ids: Any, changed: dict[int, list[str]],
            started: float | None = None) -> dict[str, Any]:
        """Train ``student``'s ``changed`` projections (``{layer: ['k_proj', ...]}``) toward ``teacher``.

        ``ids`` ``[N, T]`` are the training sequences, the last ``HELD_OUT`` held out (or all of them when
        there are too few). ``started`` (``time.perf_counter()``, default now) is when the repair began, its
        data included: ``minutes`` counts from there. Returns the record: steps, seconds, and the held-out
        losses before and after.
        """
        if not changed:
            raise TransformError("repair found no changed projections to fit: the transforms before it changed "
                                 "nothing")
        fit_started = time.perf_counter()  # the record's times, as before the bound: from here
        deadline = (fit_started if started is None else started) + 60 * self.minutes if self.minutes else None
        student_layers = attention_layers(student)
        held_out = ids[-HELD_OUT:] if len(ids) > HELD_OUT else ids
        train = ids[:-HELD_OUT] if len(ids) > HELD_OUT else ids
        generator = torch.Generator().manual_seed(self.seed)
        parameters = {index: [getattr(student_layers[index], name).weight for name in names]
                      + [getattr(student_layers[index], name).bias for name in names
                         if getattr(student_layers[index], name).bias is not None]
                      for index, names in changed.items()}
        trained = [p for group in parameters.values() for p in group]
        frozen = [p.requires_grad for p in student.parameters()]
        for parameter in student.parameters():
            parameter.requires_grad_(False)
        teacher_grad = [p.requires_grad for p in teacher.parameters()]
        for parameter in teacher.parameters():
            parameter.requires_grad_(False)
        was_training = student.training
        student.eval()
        try:
            say(f"repair: reading the original model on {len(ids)} sequences of {ids.shape[1]} tokens")
            captured = _capture(teacher, train, sorted(changed), self.batch)
            held = _capture(teacher, held_out, sorted(changed), self.batch)
            local_before = _local_errors(student_layers, held, changed)
            evaluation_started = time.perf_counter()
            kl_before = _kl(student, teacher, held, self.batch)
            evaluation_seconds = time.perf_counter() - evaluation_started  # the closing _kl costs as much
            layers_fitted = 0
            for index in sorted(changed):
                if hasattr(student_layers[index], "source_index"):
                    continue  # a cla layer reading the layer below: only the whole-model stage can fit it
                if deadline is not None and time.perf_counter() + evaluation_seconds > deadline:
                    say(f"repair: the {self.minutes:g}-minute bound is reached; layers from {index} on stay as the "
                        "transform made them")
                    break
                for parameter in parameters[index]:
                    parameter.requires_grad_(True)
                with torch.enable_grad():  # a caller's no_grad must not silently stop the training
                    self._fit_layer(student_layers[index], captured, index, parameters[index], generator)
                say(f"repair: layer {index} fitted ({time.perf_counter() - fit_started:.0f} s)")
                for parameter in parameters[index]:
                    parameter.requires_grad_(False)
                layers_fitted += 1
            local_seconds = time.perf_counter() - fit_started
            local_after = _local_errors(student_layers, held, changed)
            for parameter in trained:
                parameter.requires_grad_(True)
            # the closing measurements (held-out local errors and KL) cost about two opening KLs
            model_deadline = None if deadline is None else deadline - 2 * evaluation_seconds
            with torch.enable_grad():
                model_steps = self._fit_model(student, teacher, captured, trained, generator, model_deadline)
            kl_after = _kl(student, teacher, held, self.batch)
        finally:
            for parameter, flag in zip(student.parameters(), frozen, strict=True):
                parameter.requires_grad_(flag)
            for parameter, flag in zip(teacher.parameters(), teacher_grad, strict=True):
                parameter.requires_grad_(flag)
            student.train(was_training)
        return {"changed": {str(k): v for k, v in sorted(changed.items())}, "local_steps": self.local_steps,
                "steps": model_steps, "layers_fitted": layers_fitted, "minutes": self.minutes,
                "autocast_bf16": fast_bf16(ids.device), "train_tokens": int(train.numel()), "data": self.data,
                "held_out_local_error": [_mean(local_before), _mean(local_after)],
                "held_out_kl": [kl_before, kl_after], "local_seconds": local_seconds,
                "seconds": time.perf_counter() - fit_started}

    def _schedule(self, optimizer: Any, total: list[int]) -> Any:
        """Linear warm-up, then cosine decay to zero at ``total[0]`` steps (read at every step, so a
        time-bounded stage may set it during the warm-up)."""
        def factor(step: int) -> float:
            if step < WARMUP:
                return (step + 1) / WARMUP
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - WARMUP) / max(1, total[0] - WARMUP))))
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _fit_layer(self, module: Any, captured: dict[str, Any], index: int, parameters: list[Any],
                   generator: Any) -> None:
        """Layer-wise stage: the attention on the teacher's inputs toward the teacher's outputs."""
        if self.local_steps == 0:
            return
        inputs, outputs = captured["inputs"][index], captured["outputs"][index]
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        scheduler = self._schedule(optimizer, [self.local_steps])
        for _ in range(self.local_steps):
            rows = torch.randint(0, len(inputs), (min(self.batch, len(inputs)),), generator=generator)
            loss = _relative_error(module, inputs[rows.to(inputs.device)], outputs[rows.to(inputs.device)],
                                   captured["rotary"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()

    def _fit_model(self, student: Any, teacher: Any, captured: dict[str, Any], parameters: list[Any],
                   generator: Any, deadline: float | None) -> int:
        """Whole-model stage: the student's next-token distribution toward the teacher's. With a
        ``deadline`` (``time.perf_counter()``), the first ``TIMED_STEPS`` steps fix how many fit before it.
        Returns the number of steps run."""
        total = [self.steps]
        if self.steps == 0 or (deadline is not None and time.perf_counter() >= deadline):
            return 0
        ids, final = captured["ids"], captured["final"]
        optimizer = torch.optim.Adam(parameters, lr=self.lr)
        scheduler = self._schedule(optimizer, total)
        step_started = time.perf_counter()
        step = 0
        while step < total[0]:
            rows = torch.randint(0, len(ids), (min(self.batch, len(ids)),), generator=generator).to(ids.device)
            loss = _distillation_loss(student, teacher, ids[rows], final[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if deadline is not None and step == TIMED_STEPS:
                per_step = (time.perf_counter() - step_started) / TIMED_STEPS
                total[0] = max(step, min(self.steps, step + int((deadline - time.perf_counter()) / per_step)))
                say(f"repair: whole model, {per_step:.1f} s a step: {total[0]} of {self.steps} steps fit the "
                    f"{self.minutes:g} minutes")
            if step % 25 == 0 or step == total[0]:
                say(f"repair: whole model, step {step} of {total[0]}, KL {float(loss.detach()):.3f}")
        return step


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _autocast(device: Any) -> Any:
    """bfloat16 autocast on the model's device (the matmuls; weights and optimiser state stay fp32) where
    it multiplies bf16 natively; float32 (no autocast) elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast_bf16(device))


def _capture(teacher: Any, ids: Any, layers: list[int], batch: int) -> dict[str, Any]:
    """Run ``teacher`` on ``ids`` ``[N, T]``; keep (bfloat16) each listed layer's attention input and output
    ``[N, T, h]``, the final hidden states ``[N, T, h]``, and the rotary tables of one sequence."""
    modules = attention_layers(teacher)
    inputs: dict[int, list[Any]] = {index: [] for index in layers}
    outputs: dict[int, list[Any]] = {index: [] for index in layers}
    rotary: list[Any] = []
    handles = []

    def hook_for(index: int) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            inputs[index].append(hidden.detach().to(torch.bfloat16))
            outputs[index].append(output[0].detach().to(torch.bfloat16))
            if not rotary:
                cos, sin = kwargs["position_embeddings"]
                rotary.append((cos[:1].detach(), sin[:1].detach()))
        return hook

    for index in layers:
        handles.append(modules[index].register_forward_hook(hook_for(index), with_kwargs=True))
    final = []
    try:
        with torch.no_grad():
            for start in range(0, len(ids), batch):
                out = teacher.model(input_ids=ids[start:start + batch], use_cache=False)
                final.append(out.last_hidden_state.to(torch.bfloat16))
    finally:
        for handle in handles:
            handle.remove()
    return {"ids": ids, "final": torch.cat(final), "rotary": rotary[0],
            "inputs": {index: torch.cat(chunks) for index, chunks in inputs.items()},
            "outputs": {index: torch.cat(chunks) for index, chunks in outputs.items()}}


def _relative_error(module: Any, inputs: Any, targets: Any, rotary: tuple[Any, Any]) -> Any:
    """``||attn(inputs) - targets||^2 / ||targets||^2`` for one attention module, ``inputs`` ``[B, T, h]``."""
    cos, sin = rotary
    rows = inputs.shape[0]
    with _autocast(inputs.device):
        out = module(hidden_states=inputs.float(), position_embeddings=(cos.expand(rows, -1, -1),
                                                                        sin.expand(rows, -1, -1)),
                     attention_mask=None)[0]
    difference = out.float() - targets.float()
    return difference.pow(2).sum() / targets.float().pow(2).sum().clamp(min=1e-30)


def _local_errors(modules: list[Any], captured: dict[str, Any], changed: dict[int, list[str]]) -> list[float]:
    """Held-out relative error of every changed layer's attention output."""
    with torch.no_grad():
        return [float(_relative_error(modules[index], captured["inputs"][index], captured["outputs"][index],
                                      captured["rotary"])) for index in sorted(changed)
                if not hasattr(modules[index], "source_index")]


def _distillation_loss(student: Any, teacher: Any, ids: Any, final: Any) -> Any:
    """Mean KL(teacher || student) per token, the teacher's logits from its final hidden states ``final``."""
    with _autocast(ids.device):
        with torch.no_grad():
            target = torch.log_softmax(teacher.lm_head(final.float()).float(), dim=-1)
        hidden = student.model(input_ids=ids, use_cache=False).last_hidden_state
        predicted = torch.log_softmax(student.lm_head(hidden).float(), dim=-1)
    return (target.exp() * (target - predicted)).sum(-1).mean()


def _kl(student: Any, teacher: Any, captured: dict[str, Any], batch: int) -> float:
    """Held-out mean KL(teacher || student) per token."""
    ids, final = captured["ids"], captured["final"]
    total = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), batch):
            rows = slice(start, start + batch)
            total += float(_distillation_loss(student, teacher, ids[rows], final[rows])) * len(ids[rows])
    return total / len(ids)


def repair_data(teacher: Any, method: Repair, *, tokenizer: Any, source: str, calibration_ids: Any) -> Any:
    """``[sequences + HELD_OUT, length]`` token ids to repair on (see :class:`Repair`'s ``data``).

    ``calibration_ids`` ``[B, T]``, when given, are used as they are (no tokenizer needed).
    """
    if calibration_ids is not None:
        return calibration_ids
    if tokenizer is None:
        raise TransformError("repair trains on text: pass tokenizer= (or calibration_ids=)")
    from kvstack.calibration.text import calibration_text_ids

    device = next(teacher.parameters()).device
    count = method.sequences + HELD_OUT
    if method.data != "generated":
        flat, _ = calibration_text_ids(tokenizer, count * method.length, method.data)
        return torch.tensor(flat, device=device).view(count, method.length)
    flat, _ = calibration_text_ids(tokenizer, count * SEED_TOKENS * 8, source)
    seeds = torch.tensor(flat, device=device).view(count, SEED_TOKENS * 8)[:, :SEED_TOKENS]
    new_tokens = method.length - SEED_TOKENS
    say(f"repair: the original model writes {count} sequences of {method.length} tokens")
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(method.seed)
        for start in range(0, count, 16):
            with torch.no_grad():
                out = teacher.generate(input_ids=seeds[start:start + 16], do_sample=True, top_p=0.95,
                                       max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       attention_mask=torch.ones_like(seeds[start:start + 16]),
                                       pad_token_id=tokenizer.eos_token_id)
            rows.append(out[:, :method.length])
    return torch.cat(rows)
