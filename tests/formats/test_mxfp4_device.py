"""The accelerator branch of the MXFP4 decode (the formula on the tensors' own device, in row
chunks) gives the host branch's values bit for bit; run here on CPU tensors, on a GPU by the gpu
mark."""
from __future__ import annotations

import pytest
import torch

from gptoss_verify.formats import mxfp4


def _every_byte_under_every_scale():
    blocks = torch.arange(256, dtype=torch.uint8).repeat(255 * 16 // 256 + 1)[: 255 * 16].reshape(255, 1, 16)
    blocks = torch.cat([blocks, blocks.roll(7, dims=-1)], dim=1)  # [255 scales, 2 groups, 16 bytes]
    scales = torch.arange(255, dtype=torch.uint8)[:, None].expand(255, 2).contiguous()
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_device_branch_equals_host_branch(dtype):
    blocks, scales = _every_byte_under_every_scale()
    host = mxfp4.decode(blocks, scales, dtype)
    here = mxfp4._decode_in_place(blocks, scales, dtype)
    assert torch.equal(host.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       here.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.gpu
def test_decode_stays_on_the_gpu():
    blocks, scales = _every_byte_under_every_scale()
    out = mxfp4.decode(blocks.cuda(), scales.cuda(), torch.bfloat16)
    assert out.is_cuda
    assert torch.equal(out.cpu().view(torch.int16), mxfp4.decode(blocks, scales).view(torch.int16))
    finite = out[out.isfinite().all(-1)]  # scales 253 and 254 overflow bf16 for the larger codes
    assert finite.shape[0] == 253
    b, s = mxfp4.encode(finite)  # values on their blocks' grid: encoding them back is exact
    assert b.is_cuda and s.is_cuda
    assert torch.equal(mxfp4.decode(b, s, torch.bfloat16).view(torch.int16), finite.view(torch.int16))
