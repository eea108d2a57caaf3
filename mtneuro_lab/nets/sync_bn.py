"""Batch norm synchronised over DDP ranks on CPU (gloo) as well as on GPU.

With N ranks each holding ``B / N`` samples, plain batch norm normalises by per-rank
statistics, so an N-process run is not the 1-process run. ``torch.nn.SyncBatchNorm`` fixes that
on GPUs only (it raises for CPU tensors, and torch's DDP refuses it in CPU modules).
:class:`SyncBatchNorm` computes the same thing on CPU: the global mean, then the global biased
variance from the centred sums (two all-reduces, differentiable, so the backward pass sees the
global statistics as torch's does). Outside training, or with one rank, it is plain batch norm.
Parameter and buffer names are those of ``nn.BatchNorm*d``: checkpoints do not change.

:class:`SyncBatchNormPlugin` is the Lightning plugin (``trainer.sync_batchnorm: true``) that
converts a model's batch norms for DDP fitting (torch's layer on GPU, ours on CPU) and reverts
them afterwards.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.autograd import Function
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(Function):
    """Sum over ranks; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return _AllReduceSum.apply(tensor)


class AnyBatchNorm(_BatchNorm):
    """Batch norm over any input of shape ``(N, C, ...)`` (what a converted layer reverts to)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {x.dim()}D")


class SyncBatchNorm(AnyBatchNorm):
    """Batch norm whose training statistics span every DDP rank, for CPU tensors.

    Not a ``torch.nn.SyncBatchNorm``: torch's DDP refuses those on CPU modules. GPU models get
    torch's own layer instead (:class:`SyncBatchNormPlugin`).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if not self.training or world == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(x.numel() // x.shape[1], dtype=torch.long, device=x.device)
        dist.all_reduce(count)  # exact in int64 (a float32 count is not beyond 2**24 voxels)
        mean = all_reduce_sum(x.sum(dims)) / count
        centred = x - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / count
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor) -> None:
        """As ``F.batch_norm`` does: momentum (or cumulative) average, unbiased variance."""
        assert self.num_batches_tracked is not None and self.running_mean is not None and self.running_var is not None
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * count / (count - 1).clamp(min=1)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)


def swap_batchnorm(
    module: nn.Module, old: tuple[type[_BatchNorm], ...], new: type[_BatchNorm], skip: tuple[type, ...] = ()
) -> nn.Module:
    """``module`` with every layer of a type in ``old`` (not ``skip``) replaced by a ``new`` layer
    sharing its parameters and buffers; the tree is changed in place and its root returned."""
    if isinstance(module, old) and not isinstance(module, skip):
        swapped = new(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            swapped.weight, swapped.bias = module.weight, module.bias
        swapped.running_mean, swapped.running_var = module.running_mean, module.running_var
        swapped.num_batches_tracked = module.num_batches_tracked
        swapped.train(module.training)
        module = swapped
    for name, child in list(module.named_children()):
        module.add_module(name, swap_batchnorm(child, old, new, skip))
    return module


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch norm of ``module`` as :class:`SyncBatchNorm` (CPU models)."""
    return swap_batchnorm(module, (_BatchNorm,), SyncBatchNorm, skip=(SyncBatchNorm, nn.SyncBatchNorm))


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm``, for CPU models too: torch's ``nn.SyncBatchNorm`` on GPU,
    :class:`SyncBatchNorm` on CPU; reverted to plain batch norm after fitting."""

    def apply(self, model: nn.Module) -> nn.Module:
        if any(p.is_cuda for p in model.parameters()):
            return super().apply(model)
        return convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        return swap_batchnorm(super().revert(model), (SyncBatchNorm,), AnyBatchNorm)
