"""Adapters that turn a module's forward input and output gradient into projected per-example gradients.

A supported layer's per-example weight gradient is ``G = sum_l u_l v_l^T`` over positions ``l``
(sequence positions, convolution windows; one position for a plain 2-D input). Each adapter says
which side comes from the forward input and which from the output gradient, and projects both:

- :class:`LinearAdapter`: ``u`` = output gradient (d_out), ``v`` = input (d_in, +1 for the bias).
- :class:`Conv1DAdapter`: ``transformers``' ``Conv1D`` (GPT-2's attention and MLP layers), a linear layer
  whose weight is stored transposed, (d_in, d_out); recorded in the Linear layout (d_out rows). Found by
  its shape, so the core never imports ``transformers``.
- :class:`Conv2dAdapter`: ``u`` = output gradient per window (C_out), ``v`` = unfolded input window
  (C_in*kh*kw, +1 for the bias). ``groups > 1`` is not supported.
- :class:`EmbeddingAdapter`: weight (V, D); ``u`` = one-hot token (V, gathered from ``P_out``, never
  built), ``v`` = output gradient (D).

Mixed precision: under autocast the hooks see float16 or bfloat16 inputs and output gradients; both are
cast to float32 before they are projected, so projections and products always run in float32 or wider.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dvemb.calibration import FactorCovariance
from dvemb.errors import ConfigError
from dvemb.projection import LayerProjection

__all__ = [
    "SUPPORTED_TYPES",
    "Conv1DAdapter",
    "Conv2dAdapter",
    "EmbeddingAdapter",
    "LayerAdapter",
    "LinearAdapter",
    "adapter_type",
    "is_default_layer",
    "make_adapter",
    "widened",
]


class LayerAdapter(ABC):
    """Projects per-example gradients of one module.

    Args:
        name: the module's qualified name in the model.
        module: the module itself.
        projection: its seeded projection (dimensions must match :meth:`gradient_shape`).
    """

    kind: ClassVar[str]
    #: True when the forward input gives the out side ``u`` (embedding), False when it gives ``v``.
    forward_is_out: ClassVar[bool] = False

    def __init__(self, name: str, module: nn.Module, projection: LayerProjection) -> None:
        self.name = name
        self.module = module
        self.projection = projection
        self._matrices: dict[tuple[str, torch.dtype, torch.device], torch.Tensor] = {}

    @staticmethod
    @abstractmethod
    def gradient_shape(module: nn.Module) -> tuple[int, int]:
        """(out_dim, in_dim) of the module's weight-gradient matrix, bias column included."""

    @abstractmethod
    def forward_factor(self, inputs: tuple[object, ...]) -> torch.Tensor:
        """Projected forward-side factor, (B, L, k) with k = k_out or k_in, detached."""

    @abstractmethod
    def backward_factor(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Projected backward-side factor from the output gradient, (B, L, k), detached."""

    def parameter_count(self) -> int:
        """Number of parameters whose gradient this adapter records (weight and bias)."""
        return sum(p.numel() for p in self.module.parameters(recurse=False))

    def combine(self, forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
        """Per-example projected gradients from both factors.

        Args:
            forward: (B, L, k_f) from :meth:`forward_factor`.
            backward: (B, L, k_b) from :meth:`backward_factor`.

        Returns:
            (B, k_out * k_in) in the layout of the weight matrix (out rows, in columns), flattened.
        """
        out_side, in_side = (forward, backward) if self.forward_is_out else (backward, forward)
        if out_side.shape[1] == 1:  # one position: an outer product, cheaper as a broadcast than an einsum
            return (out_side[:, 0, :, None] * in_side[:, 0, None, :]).flatten(1)
        projected = torch.einsum("blo,bli->boi", out_side, in_side)  # (B, k_out, k_in)
        return projected.flatten(1)

    def combine_rows(self, forward: torch.Tensor, backward: torch.Tensor) -> torch.Tensor:
        """Projected gradients of R curvature rows at once (one product per layer instead of one per row).

        Args:
            forward: (B, L, k_f) from :meth:`forward_factor`, shared by every row.
            backward: (R, B, L, k_b): :meth:`backward_factor` of each row's output gradient.

        Returns:
            (B, R, k_out * k_in), each row as :meth:`combine` gives it.
        """
        if self.forward_is_out:
            spec, out_side, in_side = "blo,rbli->broi", forward, backward
        else:
            spec, out_side, in_side = "rblo,bli->broi", backward, forward
        if forward.shape[1] == 1:  # one position: an outer product, cheaper as a broadcast than an einsum
            if self.forward_is_out:
                product = out_side[None, :, 0, :, None] * in_side[:, :, 0, None, :]  # (R, B, k_out, k_in)
            else:
                product = out_side[:, :, 0, :, None] * in_side[None, :, 0, None, :]
            return product.transpose(0, 1).flatten(2)
        return torch.einsum(spec, out_side, in_side).flatten(2)

    def _matrix(self, side: str, like: torch.Tensor) -> torch.Tensor:
        key = (side, like.dtype, like.device)
        if key not in self._matrices:
            p = self.projection
            make = p.p_out if side == "out" else p.p_in
            self._matrices[key] = make(dtype=like.dtype, device=like.device)
        return self._matrices[key]

    def _project(self, side: str, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, dim) @ P_side (dim, k) -> (B, L, k) in float32 or wider; the identity is skipped."""
        x = widened(x)
        if self.projection.side_is_identity(side):
            return x
        return x @ self._matrix(side, x)

    def project_forward(self, raw: torch.Tensor) -> torch.Tensor:
        """Project a factor from :meth:`raw_forward` with the current projection: (B, L, k) as
        :meth:`forward_factor` gives it."""
        return self._project("out" if self.forward_is_out else "in", raw)

    def project_backward(self, raw: torch.Tensor) -> torch.Tensor:
        """Project a factor from :meth:`raw_backward` (any leading dims, (..., dim) -> (..., k)) with the
        current projection, as :meth:`backward_factor` does."""
        return self._project("in" if self.forward_is_out else "out", raw)

    def add_covariance(self, covariance: FactorCovariance, forward: torch.Tensor, backward: torch.Tensor) -> None:
        """Add the per-example gradients of unprojected factors to the weight's factor covariances.

        Args:
            covariance: the covariances of this layer's weight (shared by a tied partner).
            forward: (B, L, ·) from :meth:`raw_forward`.
            backward: (B, L, ·) from :meth:`raw_backward` (an output gradient or a curvature row's).
        """
        covariance.add_gradient(backward, forward)

    def set_projection(self, projection: LayerProjection) -> None:
        """Switch to another projection of the same layer (after calibration), dropping cached matrices."""
        self.projection = projection
        self._matrices.clear()

    def raw_forward(self, inputs: tuple[object, ...]) -> torch.Tensor:
        """Unprojected forward-side factor (B, L, dim), detached, for calibration."""
        raise ConfigError(f"layer {self.name!r} ({self.kind}) cannot be calibrated; it keeps its random projection")

    def raw_backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        """Unprojected backward-side factor (B, L, dim), detached, for calibration."""
        raise ConfigError(f"layer {self.name!r} ({self.kind}) cannot be calibrated; it keeps its random projection")


def widened(x: torch.Tensor) -> torch.Tensor:
    """float16 and bfloat16 (autocast) as float32; other dtypes unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _as_positions(x: torch.Tensor, feature_dim: int) -> torch.Tensor:
    """(B, *, d) -> (B, L, d) with L the product of the middle dimensions (1 for a 2-D input)."""
    if x.dim() == 1:
        raise ConfigError(f"layer input has shape {tuple(x.shape)}; dvemb needs a leading batch dimension")
    return x.reshape(x.shape[0], -1, feature_dim)


class LinearAdapter(LayerAdapter):
    """``nn.Linear`` with inputs (B, d_in) or (B, ..., d_in); positions are summed."""

    kind = "linear"

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        """(d_out, d_in) of the layer, bias not counted."""
        assert isinstance(module, nn.Linear)
        return module.out_features, module.in_features

    @classmethod
    def gradient_shape(cls, module: nn.Module) -> tuple[int, int]:
        d_out, d_in = cls.features(module)
        return d_out, d_in + (1 if getattr(module, "bias", None) is not None else 0)

    def _inputs(self, inputs: tuple[object, ...]) -> torch.Tensor:
        x = inputs[0]
        assert isinstance(x, torch.Tensor)
        return widened(_as_positions(x.detach(), self.features(self.module)[1]))  # (B, L, d_in)

    def raw_forward(self, inputs: tuple[object, ...]) -> torch.Tensor:
        a = self._inputs(inputs)
        if self.module.bias is None:
            return a
        return torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)  # (B, L, d_in + 1)

    def forward_factor(self, inputs: tuple[object, ...]) -> torch.Tensor:
        if self.module.bias is None or self.projection.side_is_identity("in"):
            return self._project("in", self.raw_forward(inputs))
        a = self._inputs(inputs)
        p_in = self._matrix("in", a)  # (d_in + 1, k_in): the last row multiplies the bias's constant 1
        return a @ p_in[:-1] + p_in[-1]  # (B, L, k_in)

    def raw_backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        return widened(_as_positions(grad_output.detach(), self.features(self.module)[0]))  # (B, L, d_out)

    def backward_factor(self, grad_output: torch.Tensor) -> torch.Tensor:
        return self._project("out", self.raw_backward(grad_output))


class Conv1DAdapter(LinearAdapter):
    """``transformers.pytorch_utils.Conv1D``: ``y = x @ W + b`` with ``W`` (d_in, d_out); the per-example
    gradient is recorded as the Linear one, (d_out, d_in + 1), i.e. of ``W^T`` with the bias column last."""

    kind = "conv1d"

    @staticmethod
    def features(module: nn.Module) -> tuple[int, int]:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[1]), int(weight.shape[0])

    @staticmethod
    def matches(module: nn.Module) -> bool:
        """True for a module shaped like ``transformers``' Conv1D (matched by name and shape, not imported)."""
        weight = getattr(module, "weight", None)
        return (
            type(module).__name__ == "Conv1D"
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None))
        )


class Conv2dAdapter(LayerAdapter):
    """``nn.Conv2d`` (groups=1, any padding mode): windows are unfolded and summed over positions."""

    kind = "conv2d"

    @staticmethod
    def gradient_shape(module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            raise ConfigError(
                f"Conv2d with groups={module.groups} is not supported (its weight gradient is block-diagonal); "
                "leave this layer out with layers=[...]"
            )
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw + (1 if module.bias is not None else 0)

    def forward_factor(self, inputs: tuple[object, ...]) -> torch.Tensor:
        return self._project("in", self.raw_forward(inputs))

    def raw_forward(self, inputs: tuple[object, ...]) -> torch.Tensor:
        conv = self.module
        assert isinstance(conv, nn.Conv2d)
        x = inputs[0]
        assert isinstance(x, torch.Tensor)
        x = widened(x.detach())
        # Pad exactly as the module does (zeros, reflect, replicate, circular, or 'same'), then unfold unpadded.
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
        windows = F.unfold(x, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)  # (B, C_in*kh*kw, L)
        a = windows.transpose(1, 2)  # (B, L, C_in*kh*kw)
        if conv.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        return a

    def raw_backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        return widened(grad_output.detach()).flatten(2).transpose(1, 2)  # (B, C_out, H', W') -> (B, L, C_out)

    def backward_factor(self, grad_output: torch.Tensor) -> torch.Tensor:
        return self._project("out", self.raw_backward(grad_output))


class EmbeddingAdapter(LayerAdapter):
    """``nn.Embedding`` (dense gradients); rows at ``padding_idx`` get no gradient, as in PyTorch."""

    kind = "embedding"
    forward_is_out = True

    @staticmethod
    def gradient_shape(module: nn.Module) -> tuple[int, int]:
        assert isinstance(module, nn.Embedding)
        if module.sparse or module.scale_grad_by_freq:
            raise ConfigError(
                "nn.Embedding with sparse=True or scale_grad_by_freq=True is not supported; "
                "leave this layer out with layers=[...]"
            )
        return module.num_embeddings, module.embedding_dim

    def forward_factor(self, inputs: tuple[object, ...]) -> torch.Tensor:
        return self.project_forward(self.raw_forward(inputs))

    def raw_forward(self, inputs: tuple[object, ...]) -> torch.Tensor:
        """The tokens, (B, L) int64, -1 at the padding index: the one-hot out side, never built."""
        emb = self.module
        assert isinstance(emb, nn.Embedding)
        idx = inputs[0]
        assert isinstance(idx, torch.Tensor)
        if idx.dim() < 1:
            raise ConfigError("embedding input needs a leading batch dimension")
        idx = idx.detach().reshape(idx.shape[0], -1).long()  # (B, L)
        if emb.padding_idx is not None:
            idx = idx.masked_fill(idx == emb.padding_idx, -1)
        return idx

    def project_forward(self, raw: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens -> (B, L, k_out): ``P_out^T e_idx`` gathered, zero at the padding index."""
        assert isinstance(self.module, nn.Embedding)
        p_out = self._matrix("out", widened(self.module.weight))  # (V, k_out); the identity when not projected
        rows = p_out[raw.clamp(min=0)]
        return rows * (raw >= 0).unsqueeze(-1).to(rows.dtype)

    def raw_backward(self, grad_output: torch.Tensor) -> torch.Tensor:
        assert isinstance(self.module, nn.Embedding)
        return widened(_as_positions(grad_output.detach(), self.module.embedding_dim))  # (B, L, D)

    def backward_factor(self, grad_output: torch.Tensor) -> torch.Tensor:
        return self.project_backward(self.raw_backward(grad_output))

    def add_covariance(self, covariance: FactorCovariance, forward: torch.Tensor, backward: torch.Tensor) -> None:
        """The token side's covariance is diagonal (one-hot factors), weighted by the output gradient's energy;
        the embedding side's is that of the output gradients at the tokens that are not padding."""
        present = (forward >= 0).to(backward.dtype)  # (B, L)
        covariance.add_one_hot("out", forward, backward.pow(2).sum(-1) * present)
        covariance.add("in", backward, present)


SUPPORTED_TYPES: dict[type[nn.Module], type[LayerAdapter]] = {
    nn.Linear: LinearAdapter,
    nn.Conv2d: Conv2dAdapter,
    nn.Embedding: EmbeddingAdapter,
}


def adapter_type(module: nn.Module) -> type[LayerAdapter] | None:
    """The adapter class that records ``module``, or None when dvemb cannot record it."""
    found = SUPPORTED_TYPES.get(type(module))
    if found is None and Conv1DAdapter.matches(module):
        return Conv1DAdapter
    return found


def is_default_layer(module: nn.Module) -> bool:
    """True for the layers recorded when no ``layers=`` is given: ``nn.Linear`` and ``transformers``' Conv1D."""
    return type(module) is nn.Linear or Conv1DAdapter.matches(module)


def make_adapter(name: str, module: nn.Module, projection: LayerProjection) -> LayerAdapter:
    """The adapter for ``module``, or a :class:`ConfigError` naming the unsupported type."""
    found = adapter_type(module)
    if found is None:
        supported = ", ".join([*(t.__name__ for t in SUPPORTED_TYPES), "transformers' Conv1D"])
        raise ConfigError(f"layer {name!r} is a {type(module).__name__}; dvemb records {supported}")
    return found(name, module, projection)
