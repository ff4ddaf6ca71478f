"""All quantized weights of a model as one flat vector, so quantizer work takes a few kernels.

Quantizing layer by layer costs a few kernels per layer for every operation (ResNet20 has 22
quantized layers: about 400 more kernel launches per STE step and 760 more per MetaQuant step
than the ~180 of the whole full-precision step). On a GPU those launches, rather than the
arithmetic, are expected to bound a small model's step. A ``FlatLayout`` lays the weights end
to end in *memory order* (a channels-last conv weight as (O, H, W, I)), so flattening them is
one ``cat`` and each layer's slice of a flat result is a free view with the parameter's own
strides. Per-layer (or per-filter) constants, such as DoReFa's max|tanh W| and BWN's mean|W|,
are reduced per segment and broadcast back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def memory_order(t: Tensor) -> list[int]:
    """The dims of ``t`` from outermost to innermost in memory (a permutation of range(dim))."""
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _inverse(order: Sequence[int]) -> list[int]:
    return sorted(range(len(order)), key=order.__getitem__)


class FlatLayout:
    """Where each of a list of tensors lives in one flat vector (memory order, end to end)."""

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.key = self.key_of(tensors)
        self.orders = [memory_order(t) for t in tensors]
        self.shapes = [tuple(t.shape) for t in tensors]
        self.sizes = [t.numel() for t in tensors]
        self.numel = sum(self.sizes)
        self._permuted = [
            tuple(shape[d] for d in order)
            for shape, order in zip(self.shapes, self.orders, strict=True)
        ]
        self._inverse = [_inverse(order) for order in self.orders]
        self.filters = [shape[0] if len(shape) > 1 else 1 for shape in self.shapes]
        # conv weights only (dim > 2): a linear weight counts as one filter
        self.conv_filters = [shape[0] if len(shape) > 2 else 1 for shape in self.shapes]
        # per-filter segments need each filter contiguous: dim 0 outermost (true for contiguous
        # and channels-last weights; a transposed view would not be)
        self.filters_contiguous = all(not order or order[0] == 0 for order in self.orders)
        self._lengths: dict[tuple[torch.device, bool, bool], Tensor] = {}

    @staticmethod
    def key_of(tensors: Sequence[Tensor]) -> tuple:
        """Shapes and strides: a layout fits any list of tensors with the same key."""
        return tuple((tuple(t.shape), t.stride()) for t in tensors)

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """One vector of all ``tensors`` (differentiable; one copy, no per-layer reorder)."""
        pairs = zip(tensors, self.orders, strict=True)
        return torch.cat([t.permute(order).reshape(-1) for t, order in pairs])

    def unflatten(self, flat: Tensor) -> list[Tensor]:
        """Views of ``flat``, one per tensor, with the original shapes and strides."""
        return [
            part.view(permuted).permute(inverse)
            for part, permuted, inverse in zip(
                flat.split(self.sizes), self._permuted, self._inverse, strict=True
            )
        ]

    def unflatten_stacked(self, flat: Tensor) -> list[Tensor]:
        """``unflatten`` of every row of ``flat`` (K, numel): views (K, *shape) per tensor."""
        rows = flat.shape[0]
        return [
            part.view(rows, *permuted).permute(0, *(d + 1 for d in inverse))
            for part, permuted, inverse in zip(
                flat.split(self.sizes, dim=1), self._permuted, self._inverse, strict=True
            )
        ]

    def reorder(self, flat: Tensor, orders: Sequence[Sequence[int]] | None) -> Tensor:
        """Rows of ``flat`` (N, ...), laid out by a layout with memory ``orders`` (None: plain
        row-major per tensor, how step state was laid out before), in this layout's order."""
        rest = tuple(flat.shape[1:])
        trailing = list(range(-len(rest), 0))
        parts = []
        for part, shape, source, order in zip(
            flat.split(self.sizes),
            self.shapes,
            orders or [list(range(len(shape))) for shape in self.shapes],
            self.orders,
            strict=True,
        ):
            saved = part.reshape(*(shape[d] for d in source), *rest)
            plain = saved.permute(*_inverse(source), *trailing)  # dims back in shape order
            parts.append(plain.permute(*order, *trailing).reshape(-1, *rest))
        return torch.cat(parts)

    def _segment_lengths(
        self, device: torch.device, per_filter: bool, conv_only: bool = False
    ) -> Tensor:
        key = (device, per_filter, conv_only)
        if key not in self._lengths:
            if per_filter:
                filters = self.conv_filters if conv_only else self.filters
                pairs = zip(self.sizes, filters, strict=True)
                lengths = [size // f for size, f in pairs for _ in range(f)]
            else:
                lengths = self.sizes
            self._lengths[key] = torch.tensor(lengths, device=device)
        return self._lengths[key]

    def broadcast(
        self, values: Tensor, per_filter: bool = False, conv_only: bool = False
    ) -> Tensor:
        """Per-segment ``values`` (one per tensor, or per filter; ``conv_only``: per filter of
        conv weights, one per linear weight) repeated over their elements."""
        lengths = self._segment_lengths(values.device, per_filter, conv_only)
        return torch.repeat_interleave(values, lengths, output_size=self.numel)

    def amax(self, flat: Tensor, foreach: bool | None = None) -> Tensor:
        """max |x| of each tensor's segment of ``flat``, shape (number of tensors,).

        ``foreach`` (default: on CUDA) uses one multi-tensor kernel instead of two per layer;
        on a CPU the per-layer loop is faster. Both give the same values."""
        parts = flat.detach().split(self.sizes)
        if flat.is_cuda if foreach is None else foreach:
            return torch.stack(torch._foreach_norm(parts, float("inf")))
        return torch.stack([p.abs().amax() for p in parts])

    def mean_abs(
        self,
        flat: Tensor,
        per_filter: bool = False,
        foreach: bool | None = None,
        conv_only: bool = False,
    ) -> Tensor:
        """mean |x| of each tensor's (or each filter's; ``conv_only``: each conv filter's and
        each linear weight's) segment of ``flat``; ``foreach`` as in ``amax`` (its sums run in
        another order: equal to float32 rounding, not bitwise)."""
        parts = flat.detach().split(self.sizes)
        if per_filter:
            if not self.filters_contiguous:
                raise ValueError("per-filter scales need dim 0 outermost in every weight")
            pairs = zip(parts, self.conv_filters if conv_only else self.filters, strict=True)
            return torch.cat([p.view(f, -1).abs().mean(1) for p, f in pairs])
        if flat.is_cuda if foreach is None else foreach:
            sums = torch.stack(torch._foreach_norm(parts, 1))
            return sums / self._segment_lengths(flat.device, False)
        return torch.stack([p.abs().mean() for p in parts])
