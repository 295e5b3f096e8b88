"""Exponential-moving-average teacher (ToCo's projection head; FSR's encoder).

The teacher is a frozen copy of the student whose parameters follow
θ_t ← m·θ_t + (1 − m)·θ_s after every `update`. It never receives gradients: its
parameters have requires_grad=False and its forward runs under no_grad, so no
loss can reach it by mistake and no optimiser that collects `requires_grad`
parameters picks it up. Being an nn.Module, it is saved and restored with the
model's state_dict, which a resumed run needs (the teacher is not recomputable
from the student).

ToCo: momentum 0.9, constant; one update per training forward, *before* the
teacher is evaluated (toco.md §1.3, §2.4).
"""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


class EMA(nn.Module):
    """A teacher that tracks `student` by EMA. Call `update(student)` then `teacher(x)`."""

    def __init__(self, student: nn.Module, momentum: float) -> None:
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.module = copy.deepcopy(student)
        for parameter in self.module.parameters():
            parameter.requires_grad_(False)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """θ_t ← m·θ_t + (1 − m)·θ_s for every parameter; buffers are copied (no averaging)."""
        teacher_parameters = dict(self.module.named_parameters())
        student_parameters = dict(student.named_parameters())
        if teacher_parameters.keys() != student_parameters.keys():
            raise ValueError("EMA.update: the student's parameters do not match the teacher's")
        for name, teacher_parameter in teacher_parameters.items():
            teacher_parameter.mul_(self.momentum).add_(student_parameters[name].detach(), alpha=1.0 - self.momentum)
        student_buffers = dict(student.named_buffers())
        for name, teacher_buffer in self.module.named_buffers():
            teacher_buffer.copy_(student_buffers[name])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*args, **kwargs)
