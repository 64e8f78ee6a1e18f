"""Importance coefficients Lambda_l = d y^c / d A_l (METHOD.md §3) by one reverse pass, and the
targets y^c: a class logit, or the similarity weights of METHOD.md §6."""
from __future__ import annotations

import torch

from .errors import TargetError


def scores_of(values: dict[str, torch.Tensor], score_name: str) -> torch.Tensor:
    s = values[score_name]
    return s.reshape(s.shape[0], -1)


def resolve_class(target, scores: torch.Tensor, labels: list[str] | None) -> int:
    """A class index from None/'top1', an int, a digit string, or label text."""
    k = scores.shape[1]
    if target is None or (isinstance(target, str) and target.lower() in ("top1", "top-1")):
        return int(scores[0].argmax())
    if isinstance(target, str) and target.strip().lstrip("-").isdigit():
        target = int(target)
    if isinstance(target, int):
        if not 0 <= target < k:
            raise TargetError(f"target class {target} is out of range: the model has {k} classes "
                              f"(0..{k - 1})")
        return target
    if isinstance(target, str):
        if not labels:
            raise TargetError(f"target '{target}' is text but the model has no labels; give an index")
        want = target.strip().lower()
        exact = [i for i, name in enumerate(labels) if name.lower() == want]
        if exact:
            return exact[0]
        partial = [i for i, name in enumerate(labels) if want in name.lower()]
        if len(partial) == 1:
            return partial[0]
        hint = ", ".join(f"{i}: {labels[i]}" for i in partial[:5])
        raise TargetError(f"target label '{target}' " + (f"is ambiguous ({hint}, ...)" if partial
                                                         else "matches no class label"))
    raise TargetError(f"target {target!r} is neither a class index nor a label")


def class_objective(score_name: str, index: int):
    def objective(values):
        return scores_of(values, score_name)[:, index].sum()
    return objective


def importance(values: dict[str, torch.Tensor], objective, tensors) -> dict[str, torch.Tensor]:
    """Lambda for each tensor in ``tensors`` (zeros where the objective does not depend on it).

    ``values`` must come from ``forward.run_graph(..., track=True)``.
    """
    y = objective(values)
    y.backward()
    lam = {}
    for t in tensors:
        v = values[t]
        lam[t] = v.grad.detach() if v.grad is not None else torch.zeros_like(v).detach()
    return lam
