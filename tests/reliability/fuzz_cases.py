"""Hypothesis strategies for the op fuzz tests: tensors with random shapes (0-size and
odd sizes), dtypes, memory layouts (transposed, strided, offset, permuted views) and
values (normal, subnormal, huge, mixed magnitudes, planted inf/-inf/nan/-0.0).

A drawn :class:`TensorSpec` is a recipe: :meth:`TensorSpec.make` builds the
same base tensor and view every time it is called, so the backend under test
and the reference each get their own identical inputs (views included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
LOW = (torch.float16, torch.bfloat16)
DIM_SIZES = (0, 1, 2, 3, 5, 7, 17, 33, 64, 127, 257)
LAYOUTS = ("contiguous", "transposed", "strided", "offset", "permuted")
REGIMES = ("normal", "subnormal", "huge", "mixed")
SPECIALS = ("inf", "-inf", "nan", "-0.0", "max", "-max", "subnormal", "tiny")
# loss scales 2**-24 .. 2**24: powers of two (what scalers use) and arbitrary values
SCALES = st.one_of(st.integers(-24, 24).map(lambda k: 2.0**k),
                   st.floats(2.0**-24, 2.0**24, allow_nan=False, allow_infinity=False))


def special_value(kind: str, dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return {"inf": math.inf, "-inf": -math.inf, "nan": math.nan, "-0.0": -0.0, "max": fi.max,
            "-max": -fi.max, "subnormal": fi.smallest_normal / 4, "tiny": fi.smallest_normal}[kind]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str
    regime: str
    exponent: int
    seed: int
    specials: tuple[tuple[float, str], ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def values(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The values in row-major order (fp64 before the final cast to ``dtype``)."""
        dtype = dtype or self.dtype
        g = torch.Generator().manual_seed(self.seed)
        n, fi = self.numel, torch.finfo(dtype)
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if self.regime == "normal":
            x = x * 2.0**self.exponent
        elif self.regime == "subnormal":
            x = x * fi.smallest_normal / 8
        elif self.regime == "huge":
            x = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * fi.max
        else:  # per-element exponents across the dtype's range
            emax = math.log2(fi.max) - 1
            e = torch.randint(int(-emax), int(emax), (n,), generator=g, dtype=torch.float64)
            x = x * torch.exp2(e)
        for frac, kind in self.specials:
            if n:
                x[int(frac * n)] = special_value(kind, dtype)
        return x.to(dtype).reshape(self.shape)

    def make(self, device="cpu", dtype: torch.dtype | None = None, values=None):
        """(base, view): ``view`` has the spec's shape and layout; ``base`` owns the memory."""
        dtype = dtype or self.dtype
        vals = self.values(dtype) if values is None else values.to(dtype)
        shape, nd = self.shape, len(self.shape)
        if self.layout == "transposed" and nd >= 2:
            base = torch.full(shape[:-2] + (shape[-1], shape[-2]), 7.0, dtype=dtype, device=device)
            view = base.transpose(-1, -2)
        elif self.layout == "strided" and nd >= 1:
            base = torch.full(shape[:-1] + (2 * shape[-1] + 1,), 7.0, dtype=dtype, device=device)
            view = base[..., 1::2]
        elif self.layout == "offset":
            base = torch.full((self.numel + 3,), 7.0, dtype=dtype, device=device)
            view = base[3:].view(shape)  # misaligned for vector loads
        elif self.layout == "permuted" and nd == 3:
            base = torch.full((shape[2], shape[0], shape[1]), 7.0, dtype=dtype, device=device)
            view = base.permute(1, 2, 0)
        else:
            base = torch.full(shape, 7.0, dtype=dtype, device=device)
            view = base
        view.copy_(vals)
        return base, view


@st.composite
def shapes(draw, max_numel: int):
    shape = list(draw(st.lists(st.sampled_from(DIM_SIZES), max_size=3)))
    while math.prod(shape) > max_numel:
        i = max(range(len(shape)), key=shape.__getitem__)
        shape[i] //= 2
    return tuple(shape)


@st.composite
def tensor_specs(draw, max_numel: int, dtypes=DTYPES, regimes=REGIMES, specials=True,
                 shape=None):
    return TensorSpec(
        shape=draw(shapes(max_numel)) if shape is None else shape,
        dtype=draw(st.sampled_from(dtypes)),
        layout=draw(st.sampled_from(LAYOUTS)),
        regime=draw(st.sampled_from(regimes)),
        exponent=draw(st.integers(-20, 20)),
        seed=draw(st.integers(0, 2**31 - 1)),
        specials=tuple(draw(st.lists(st.tuples(st.floats(0, 1, exclude_max=True),
                                               st.sampled_from(SPECIALS)), max_size=3)))
        if specials else (),
    )


def spec_lists(max_numel: int, max_tensors: int = 5, **kw):
    return st.lists(tensor_specs(max_numel, **kw), max_size=max_tensors)


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str, rtol: float = 0.0) -> None:
    """Equal values (bitwise unless ``rtol``), NaN where NaN (payloads aside), same dtype."""
    assert a.dtype == b.dtype and a.shape == b.shape, \
        f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    torch.testing.assert_close(a, b, rtol=rtol, atol=0.0, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")
