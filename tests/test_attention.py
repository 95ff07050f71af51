"""stages/attention.py: the Triton attention kernel and its diffusers processor.

There is no GPU here, so the kernel runs in Triton's interpreter (TRITON_INTERPRET=1, which must be set before
Triton is imported: each check runs in a child process). The interpreter executes the kernel's own code, block by
block, with NumPy. What it cannot run is checked otherwise: the inline PTX line by line with NumPy, the machine
code by compiling for sm_90 ahead of time. The GPU's speed and its bfloat16 matmuls are left to
bench/attention_shapes.py.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from diffedit.stages.attention import head_chunks

triton = pytest.importorskip("triton", reason="Triton is not installed (it ships with PyTorch's CUDA wheels)")


def interpreted(code: str) -> dict:
    """Run ``code`` under Triton's interpreter in a child process; it prints one JSON object, returned here."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_head_chunks():
    # SD 1.5's head sizes: 40 = 32 + 16 (8 columns of padding, against 24 at the flash kernels' 64), 80, 160 exact.
    assert head_chunks(40) == (32, 16) and head_chunks(80) == (64, 16) and head_chunks(160) == (128, 32)
    assert head_chunks(64) == (64, 0) and head_chunks(96) == (64, 32) and head_chunks(8) == (16, 0)
    assert head_chunks(120) == (128, 0)  # 64 + 64 pads as much as one chunk of 128
    for d in range(1, 300):
        da, db = head_chunks(d)
        assert da + db >= d and da >= 16 and db in (0, *(2**i for i in range(4, 9)))
    with pytest.raises(ValueError, match="head size must be positive"):
        head_chunks(0)


KERNEL_CHECK = """
import json, torch
import torch.nn.functional as F
import diffedit.stages.attention as kernel

torch.manual_seed(0)
errors = []
# (head size, queries, keys, dtype): SD 1.5's sizes, a cross-attention's 77 keys, a key count that is not a
# multiple of the key block, several query blocks, a power of two, and a head narrower than one chunk. No bfloat16:
# the interpreter's tl.dot reads bfloat16 inputs wrongly (Triton 3.8); bench/attention_shapes.py checks it on a GPU.
# Two configs: the first autotuning candidate, and small blocks (more programs and key blocks) with the next key
# block's scores issued before this one's softmax (PIPELINE). FMA_EXP changes nothing in the interpreter (it cannot
# run inline PTX): test_fma_exponential_ptx_computes_2_to_the_x checks that.
configs = [dict(BLOCK_M=128, BLOCK_N=64, FMA_EXP=False, PIPELINE=False),
           dict(BLOCK_M=32, BLOCK_N=16, FMA_EXP=True, PIPELINE=True)]
for config in configs:
    kernel.INTERPRETER_CONFIG = config
    for d, m, n, dtype in [(40, 300, 300, torch.float16), (40, 200, 77, torch.float16), (80, 70, 129, torch.float32),
                           (160, 40, 64, torch.float16), (64, 130, 40, torch.float32), (4, 17, 9, torch.float32)]:
        b, h = 2, 3
        x, c = torch.randn(b, m, h * d).to(dtype), torch.randn(b, n, h * d).to(dtype)
        # As diffusers' processors make them: (B, L, H * D) projections viewed as (B, H, L, D), not contiguous.
        q = x.unflatten(-1, (h, d)).transpose(1, 2)
        k = c.unflatten(-1, (h, d)).transpose(1, 2)
        v = (2 * c + 1).flip(1).unflatten(-1, (h, d)).transpose(1, 2)
        out = kernel.attention(q, k, v)
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        errors.append(dict(config=config, d=d, m=m, n=n, dtype=str(dtype), shape=list(out.shape),
                           dtype_out=str(out.dtype), bmhd=out.transpose(1, 2).is_contiguous(),
                           error=(out.float() - ref).abs().max().item()))
print(json.dumps(errors))
"""


def test_kernel_matches_pytorch_attention():
    """Against SDPA computed in float32: within the rounding of the output's dtype, for every head size and
    key count, with diffusers' strided inputs; the output is laid out (B, M, H, D) as the flash kernel's. At head
    size 40 the row sums come out of the P V matmul (V's padding column loaded as ones)."""
    tolerance = {"torch.float32": 1e-5, "torch.float16": 2e-3}
    rows = interpreted(KERNEL_CHECK)
    assert len(rows) == 12
    for row in rows:
        assert row["shape"][2:] == [row["m"], row["d"]] and row["dtype_out"] == row["dtype"] and row["bmhd"], row
        assert row["error"] < tolerance[row["dtype"]], row


UNET_CHECK = """
import json, torch
from diffusers import UNet2DConditionModel
from diffedit.stages.attention import TritonAttnProcessor

torch.manual_seed(0)
# SD 1.5's head sizes at a small scale: 2 heads of 40 channels, then of 80.
unet = UNet2DConditionModel(sample_size=8, block_out_channels=(80, 160), layers_per_block=1, cross_attention_dim=32,
                            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2,
                            norm_num_groups=8).eval()
x, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, 77, 32)
calls = []
processor = TritonAttnProcessor()
fallback = processor.fallback
processor.fallback = lambda *a, **k: calls.append(1) or fallback(*a, **k)
with torch.no_grad():
    ref = unet(x, t, encoder_hidden_states=text).sample
    defaults = unet.attn_processors
    unet.set_attn_processor(processor)
    out = unet(x, t, encoder_hidden_states=text).sample
    unet.set_attn_processor(defaults)
    back = unet(x, t, encoder_hidden_states=text).sample
print(json.dumps(dict(error=(out - ref).abs().max().item(), scale=ref.abs().max().item(), fallbacks=len(calls),
                      restored=bool(torch.equal(back, ref)))))
"""


def test_processor_gives_the_unets_output():
    """A UNet with SD 1.5's head sizes (40, 80), float32: the Triton processor's output is the default one's, every
    attention layer ran the kernel (no fallback), and the default processors put back give the same output again."""
    row = interpreted(UNET_CHECK)
    assert row["fallbacks"] == 0 and row["restored"], row
    assert row["error"] < 1e-5 * max(1.0, row["scale"]), row


ENGINE_CHECK = """
import json, sys, torch
from diffedit.stages.config import EditConfig
from diffedit.stages.editor import edit_batch
from diffedit.stages.model import load_model
from diffedit.stages.randomness import edit_seed

model = load_model(sys.argv[1], device="cpu", dtype="fp32")
images = torch.rand(2, 3, model.resolution, model.resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1
seeds = [edit_seed(0, f"k{i}", 0) for i in range(2)]
config = EditConfig.from_flat(steps=6, mask_samples=2)
run = lambda: edit_batch(model, images, ["a red circle"] * 2, ["a blue circle"] * 2, seeds, config)
ref = run()
model.attention = "triton"
out = run()
swapped = type(next(iter(model.unet.attn_processors.values()))).__name__
model.attention = None
back = run()
print(json.dumps(dict(swapped=swapped, mask_equal=bool(torch.equal(out.mask_Bhw, ref.mask_Bhw)),
                      error=(out.edited_BCHW - ref.edited_BCHW).abs().max().item(),
                      restored=bool(torch.equal(back.edited_BCHW, ref.edited_BCHW)),
                      processor_after=type(next(iter(model.unet.attn_processors.values()))).__name__)))
"""


def test_engine_with_triton_attention(tiny_model_dir):
    """DiffEditModel.attention = 'triton' edits as the default attention does (mask, encoding, decoding, float32),
    and setting it back puts the UNet's own processors back."""
    row = interpreted(ENGINE_CHECK.replace("sys.argv[1]", repr(str(tiny_model_dir))))
    assert row["swapped"] == "TritonAttnProcessor" and row["processor_after"] != "TritonAttnProcessor", row
    assert row["mask_equal"] and row["restored"] and row["error"] < 1e-4, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no CUDA device exists")
def test_triton_attention_without_a_gpu_is_refused_clearly(tiny_model):
    from diffedit.stages.attention import INTERPRETED

    if INTERPRETED:
        pytest.skip("this process runs Triton's interpreter, where the kernel can run on CPU")
    tiny_model.attention = "triton"
    try:
        with pytest.raises(RuntimeError, match="attention='triton' cannot run here: Triton needs a CUDA device"):
            tiny_model.predict(torch.zeros(1, 4, 8, 8), 10, tiny_model.encode_text(["a"]))
    finally:
        tiny_model.attention = None
    assert type(next(iter(tiny_model.unet.attn_processors.values()))).__name__ != "TritonAttnProcessor"


def test_kernel_compiles_for_hopper_with_tensor_cores_and_pipelined_loads():
    """Compiled ahead of time for sm_90 (Triton's own compiler and ptxas; no GPU needed) at SD 1.5's head sizes,
    with the integer arguments specialised as Triton specialises them at run time: the matmuls are Hopper's
    `wgmma` and the key/value loads are asynchronous copies, pipelined across key blocks. A head size of 40
    loses both unless the kernel is told that heads start at multiples of 8 elements (ALIGN)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from diffedit.stages.attention import CONFIGS, _flash_forward

    names = _flash_forward.arg_names
    unit_strides = ("sqd", "skd", "svd", "sod")  # the head columns are contiguous: Triton specialises a 1
    constexprs = {n for n in names if n.isupper() and len(n) > 1} | set(unit_strides)
    # BLOCK_M 128, BLOCK_N 64, 8 warps, 3 stages; without, then with a quarter of the exponentials on the FMA units.
    plain, fma = (c for c in CONFIGS if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] == 64 and c.num_warps == 8
                  and not c.kwargs["PIPELINE"])
    layout_moves = {}
    for d, dtype, config in [(40, "fp16", plain), (80, "fp16", plain), (160, "fp16", plain), (40, "bf16", plain),
                             (40, "fp16", fma)]:
        da, db = head_chunks(d)
        signature = {n: "constexpr" if n in constexprs else f"*{dtype}" if n in "QKVO" else "fp32" if n == "qk_scale"
                     else "i32" for n in names}
        values = dict(D=d, DA=da, DB=db, PRECISION="tf32", EVEN_N=True, ALIGN=math.gcd(16, d), INTERPRET=False,
                      **config.kwargs, **dict.fromkeys(unit_strides, 1))
        # Diffusers' layout (B, L, 8 x d): every stride but the head's (d) is a multiple of 16, as are the pointers.
        multiples_of_16 = {"Q", "K", "V", "O", "sqb", "sqm", "skb", "skn", "svb", "svn", "sob", "som"}
        if d % 16 == 0:
            multiples_of_16 |= {"sqh", "skh", "svh", "soh"}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in multiples_of_16}
        kernel = triton.compile(ASTSource(_flash_forward, signature, constexprs=values, attrs=attrs),
                                target=GPUTarget("cuda", 90, 64),
                                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
        ptx, ttgir, what = kernel.asm["ptx"], kernel.asm["ttgir"], f"head size {d}, {dtype}, {config.kwargs}"
        assert "wgmma.mma_async" in ptx, f"{what}: no wgmma in the sm_90 kernel"
        assert ttgir.count("async_copy_global_to_local") >= 4, f"{what}: key/value loads are not pipelined"
        assert kernel.asm["cubin"], f"{what}: ptxas gave no cubin"
        # The polynomial's PTX is in (and ptxas took it), and moved no data between threads.
        assert ("shl.b32 e, e, 23" in ptx) == config.kwargs["FMA_EXP"], what
        layout_moves[d, dtype, config.kwargs["FMA_EXP"]] = ttgir.count("convert_layout")
    assert layout_moves[40, "fp16", True] == layout_moves[40, "fp16", False], layout_moves


def test_fma_exponential_ptx_computes_2_to_the_x():
    """The polynomial exponential the GPU runs (EXP2_FMA_PTX, inline PTX the interpreter cannot execute), executed
    line by line here with NumPy's float32 and int32 arithmetic: within 7.5e-5 of 2^x over the scores' range, and
    2^-125 (zero once rounded to half precision) for a masked key's -inf."""
    import numpy as np

    from diffedit.stages.attention import EXP2_FMA_PTX

    def value(token, regs):
        if token.startswith("0f"):  # a float32 written as its bits
            return np.array([int(token[2:], 16)], np.uint32).view(np.float32)[0]
        return regs[token]

    x = np.concatenate([np.linspace(-130, 0, 200001, dtype=np.float32), np.float32([-np.inf, -0.0, -0.5, -124.6])])
    regs = {"$x": x}
    for line in EXP2_FMA_PTX.format(x="$x", y="$y").strip().splitlines():
        op, operands = line.strip().rstrip(";").split(None, 1)
        dst, *src = [t.strip() for t in operands.split(",")]
        a = [int(t) if t.isdigit() else value(t, regs) for t in src]
        if op.startswith("max.f32") or op.startswith("max.ftz.f32"):
            regs[dst] = np.maximum(a[0], a[1]).astype(np.float32)
        elif op.startswith(("add.rn", "sub.rn")):
            regs[dst] = (a[0] + a[1] if op.startswith("add") else a[0] - a[1]).astype(np.float32)
        elif op.startswith("fma.rn"):
            regs[dst] = (a[0].astype(np.float64) * a[1] + a[2]).astype(np.float32)  # one rounding, as fma
        elif op == "mov.b32":
            regs[dst] = a[0].view(np.int32) if a[0].dtype == np.float32 else a[0].view(np.float32)
        elif op == "shl.b32":
            regs[dst] = (a[0].astype(np.int64) << a[1]).astype(np.uint32).view(np.int32)
        elif op == "add.s32":
            regs[dst] = (a[0].astype(np.int64) + a[1]).astype(np.uint32).view(np.int32)
        else:
            raise AssertionError(f"the test does not know the PTX instruction {op!r}: extend it")
    y = regs["$y"].astype(np.float64)
    ref = np.exp2(np.maximum(x.astype(np.float64), -125))
    assert np.abs(y / ref - 1).max() < 7.5e-5
    assert np.isclose(y[-4], 2.0**-125, rtol=7.5e-5) and np.all(y > 0)


TUNED_CHECK = """
import json, torch
import torch.nn.functional as F
import diffedit.stages.attention as kernel

timed = []


def fake_timing(self, *args, config, **meta):  # the interpreter has no GPU clock: say which config is fastest
    timed.append((str(self.nargs["Q"].dtype), config.kwargs["FMA_EXP"]))
    fastest = config.kwargs["BLOCK_N"] == 128 and not config.kwargs["FMA_EXP"] and config.num_stages == 3
    return [1.0 if fastest else 2.0] * 3


type(kernel._tuned)._bench = fake_timing
kernel.INTERPRETED = False  # the GPU's launch path (autotuner, heuristics, pruning), run by the interpreter
rows = []
for dtype in (torch.float16, torch.float32):
    q, k, v = (torch.randn(1, n, 2, 40).to(dtype).transpose(1, 2) for n in (200, 77, 77))
    out = kernel._attention(q, k, v, 40 ** -0.5)  # the op itself: attention() would refuse CPU tensors now
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    rows.append(dict(dtype=str(dtype), error=(out.float() - ref).abs().max().item()))
print(json.dumps(dict(rows=rows, timed=timed, chosen=kernel.autotuned())))
"""


def test_autotuned_launch_path():
    """The path a GPU takes, in the interpreter with a stand-in clock: the autotuner times every configuration once
    per shape and dtype (the polynomial exponential never in float32), the key-block heuristic handles 77 keys in
    blocks of 128, the chosen configuration computes attention, and autotuned() reports it."""
    result = interpreted(TUNED_CHECK)
    assert [r["error"] < tol for r, tol in zip(result["rows"], (2e-3, 1e-5))] == [True, True], result["rows"]
    half = [fma for dtype, fma in result["timed"] if dtype == "torch.float16"]
    full = [fma for dtype, fma in result["timed"] if dtype == "torch.float32"]
    assert sorted(half) == [False] * 10 + [True] * 10 and full == [False] * 10, result["timed"]
    assert len(result["chosen"]) == 2 and all("BLOCK_N: 128, FMA_EXP: False" in c for c in result["chosen"])


COMPILED_CHECK = """
import json, sys, torch
import diffedit.stages.attention as kernel
from diffedit.stages.model import load_model

launches = [0]
jitted = kernel._flash_forward


class CountingLaunches:  # kernel[grid](...) goes through here
    def __getitem__(self, grid):
        launches[0] += 1
        return jitted[grid]


kernel._flash_forward = CountingLaunches()
model = load_model(sys.argv[1], device="cpu", dtype="fp32").compile(vae=False)
x, embeds = torch.randn(2, 4, 8, 8), model.encode_text(["a", "b"])
ref = model.predict(x, 500, embeds)
model.attention = "triton"
out = model.predict(x, 500, embeds)
on = launches[0]
model.attention = None
back = model.predict(x, 500, embeds)
print(json.dumps(dict(on=on, off=launches[0] - on, error=(out - ref).abs().max().item(), back=bool(torch.equal(back, ref)))))
"""


def test_compiled_engine_switches_attention(tiny_model_dir):
    """On a UNet compiled by DiffEditModel.compile() (inductor), setting attention to 'triton' reaches the compiled
    graph (torch.compile guards on the processors, and the op stays in the graph as one call), and setting it
    back to None runs PyTorch's attention again, with the first output exactly."""
    row = interpreted(COMPILED_CHECK.replace("sys.argv[1]", repr(str(tiny_model_dir))))
    assert row["on"] > 0 and row["off"] == 0 and row["back"] and row["error"] < 1e-5, row
