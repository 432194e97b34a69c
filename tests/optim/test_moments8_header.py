"""csrc/math/moments8.h matches the Python format (amp_engine.ops.moments8) bit for bit.

A small C++ program includes the header, builds both decode tables (and decodes
every code without them, as the CPU kernel does) and encodes
blocks of floats (absmax folded element by element, as a kernel would); its
output is compared with the reference over all 256 codes and a sweep of floats.
"""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest
import torch

from amp_engine.ops import moments8

ROOT = pathlib.Path(__file__).resolve().parents[2]
CXX = shutil.which("c++") or shutil.which("g++")

PROGRAM = r"""
#include "math/moments8.h"
#include <cstdio>
#include <vector>
using namespace amp_engine::m8;
int main() {
  for (int s = 0; s < 2; ++s)
    for (uint32_t c = 0; c < 256; ++c) std::printf("%08x\n", to_bits(decode_value(c, s == 1)));
  for (int s = 0; s < 2; ++s)  // the table-free decoder, times absmax 1 (exact)
    for (uint32_t c = 0; c < 256; ++c) std::printf("%08x\n", to_bits(decode_bits(c, 1.0f, s == 1)));
  long n;
  if (std::scanf("%ld", &n) != 1) return 1;
  std::vector<float> x(n);
  for (long i = 0; i < n; ++i) { unsigned u; std::scanf("%x", &u); x[i] = from_bits(u); }
  for (int s = 0; s < 2; ++s) {
    const int m = s ? kSignedM : kUnsignedM;
    for (long b = 0; b < n; b += kBlock) {
      const long end = b + kBlock < n ? b + kBlock : n;
      float a = 0.0f;
      for (long i = b; i < end; ++i) a = absmax_fold(a, x[i]);
      a = absmax_flush(a);
      std::printf("a %08x\n", to_bits(a));
      const float scale = encode_scale(a, m);
      for (long i = b; i < end; ++i) std::printf("%02x\n", encode(x[i], scale, s == 1));
    }
  }
  for (long i = 0; i < n; ++i) std::printf("%04x\n", bf16_round_nearest(x[i]));
  return 0;
}
"""


def _sweep() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    parts = [
        torch.randn(4096, generator=gen) * torch.rand(4096, generator=gen) ** 6,  # wide range
        torch.randn(1000, generator=gen) * 1e-30,                                    # tiny blocks
        torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0 ** -20, 3.4e38, 1e-45] * 37),
        torch.randn(300, generator=gen).abs() * 1e-3,
    ]
    # ties: exact midpoints between neighbouring codes of a block whose absmax is 1
    table = torch.tensor(moments8.decode_table(False), dtype=torch.float64)[:255]
    mids = ((table[:-1] + table[1:]) / 2).float()
    parts.append(torch.cat([torch.ones(1), mids, torch.zeros(256 - 1 - mids.numel())]))
    with_nan = torch.randn(256, generator=gen)
    with_nan[17] = float("nan")
    parts += [with_nan, torch.randn(77, generator=gen)]  # a ragged last block
    return torch.cat(parts)


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (c++/g++) on PATH")
def test_header_matches_reference(tmp_path):
    src = tmp_path / "m8.cpp"
    src.write_text(PROGRAM)
    exe = tmp_path / "m8"
    subprocess.run([CXX, "-O2", "-ffp-contract=off", "-std=c++17", f"-I{ROOT / 'csrc'}",
                    str(src), "-o", str(exe)], check=True)
    x = _sweep()
    bits = x.view(torch.int32).tolist()
    stdin = f"{x.numel()}\n" + "\n".join(f"{b & 0xFFFFFFFF:08x}" for b in bits) + "\n"
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True,
                         check=True).stdout.split()

    for s, signed in enumerate((False, True)):
        want = torch.tensor(moments8.decode_table(signed), dtype=torch.float32)
        got = torch.tensor([int(h, 16) for h in out[256 * s:256 * (s + 1)]], dtype=torch.int64)
        assert torch.equal(got, want.view(torch.int32).to(torch.int64) & 0xFFFFFFFF), \
            f"decode table (signed={signed}) differs"
        got = torch.tensor([int(h, 16) for h in out[512 + 256 * s:512 + 256 * (s + 1)]],
                           dtype=torch.int64)
        assert torch.equal(got, want.view(torch.int32).to(torch.int64) & 0xFFFFFFFF), \
            f"decode_bits (signed={signed}) differs from the table"
    rest = out[1024:]
    pos = 0
    for signed in (False, True):
        absmax = moments8.block_absmax(x)
        codes = moments8.encode(x, absmax, signed)
        for b in range(moments8.n_blocks(x.numel())):
            assert rest[pos] == "a", "unexpected program output"
            got_a = int(rest[pos + 1], 16)
            want_a = absmax[b:b + 1].view(torch.int32).item() & 0xFFFFFFFF
            # a NaN block: any NaN pattern is a NaN
            if not (torch.isnan(absmax[b]) and (got_a & 0x7F800000) == 0x7F800000):
                assert got_a == want_a, f"absmax of block {b} (signed={signed})"
            pos += 2
            n = min(moments8.BLOCK, x.numel() - b * moments8.BLOCK)
            got = [int(h, 16) for h in rest[pos:pos + n]]
            want = codes[b * moments8.BLOCK:b * moments8.BLOCK + n].tolist()
            assert got == want, f"codes of block {b} (signed={signed}) differ"
            pos += n
    got_bf16 = torch.tensor([int(h, 16) for h in rest[pos:]], dtype=torch.int64)
    want_bf16 = moments8.round_bf16_nearest(x).view(torch.int16).to(torch.int64) & 0xFFFF
    assert torch.equal(got_bf16, want_bf16)
