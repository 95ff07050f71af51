"""Attention for head sizes that are not a power of two (SD 1.5's 40, 80 and 160), in Triton.

Stable Diffusion 1.5's UNet has 8 heads at every level, so its head size is 40 on the 64 x 64 latent grid, 80 and
160 below it. PyTorch's flash and cuDNN kernels are built for head sizes 64, 96, 128, ...: they run 40 in tiles of
64, so 37.5% of their tensor-core work at the largest grid is padding (docs/BENCHMARKS.md). This kernel covers a
head of size D with two power-of-two chunks (tensor-core matmuls need power-of-two, >= 16 wide tiles): 40 = 32 +
16 (8 of them padding), 80 = 64 + 16 and 160 = 128 + 32 (none). The algorithm is FlashAttention's forward pass
(Dao et al., 2022, Algorithm 1; the rescaling of FlashAttention-2): for a block of queries, stream the keys and
values block by block, keeping a running row maximum ``m``, a running sum ``l`` of ``exp(s - m)`` and the
accumulated output, rescaled whenever ``m`` grows. The scores never reach memory.

``attention(q, k, v)`` takes SDPA's layout (q_BHMD, k_BHND, v_BHND, any strides) and returns o_BHMD stored as
o_BMHD, as PyTorch's flash kernel does, so the caller's transpose back to (B, M, H * D) is free. It is a
``torch.library`` custom op, so ``torch.compile`` keeps it in its graph as one opaque call (no graph break).
:class:`TritonAttnProcessor` puts it in a diffusers UNet. Forward only (inference), no attention mask, no dropout.

Without a GPU, Triton's interpreter (``TRITON_INTERPRET=1`` set before ``triton`` is imported) runs the same
kernel on CPU tensors, slowly; the tests check it against PyTorch's attention that way.

Shape legend: B batch, H heads, M queries, N keys, D head size; DA, DB the two chunks of D.
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only torch without Triton: the processor refuses to be installed
    triton = None

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The one config the interpreter runs (autotuning there would time every config, slowly); the tests vary it.
INTERPRETER_CONFIG = dict(BLOCK_M=128, BLOCK_N=64, FMA_EXP=False, PIPELINE=False)


def head_chunks(d: int) -> tuple[int, int]:
    """(DA, DB): power-of-two chunks, each >= 16 (DB may be 0), that cover a head of size d with the least padding."""
    if d < 1:
        raise ValueError(f"The head size must be positive but is {d}.")
    da = max(16, 1 << (d.bit_length() - 1))  # the largest power of two <= d, at least 16
    rest = d - da
    if rest <= 0:
        return da, 0
    db = max(16, 1 << (rest - 1).bit_length())  # the smallest power of two >= rest, at least 16
    return (da, db) if da + db < 2 * da else (2 * da, 0)  # one chunk when two would pad as much


def available() -> str | None:
    """None if the kernel can run here, else why not."""
    if triton is None:
        return "Triton is not installed (it comes with PyTorch's CUDA wheels on Linux)"
    if not (torch.cuda.is_available() or INTERPRETED):
        return "Triton needs a CUDA device (or TRITON_INTERPRET=1, its slow CPU interpreter)"
    return None


# 2^x for x <= 0 on the FMA units rather than the special-function unit (FlashAttention-4 offloads some this
# way): Cody and Waite's split x = n + f with n = round(x) (adding 1.5 x 2^23 leaves n in the sum's low bits),
# 2^f for f in [-0.5, 0.5] from a degree-3 polynomial fitted to relative error < 7.5e-5 (half precision rounds
# at 2.4e-4), then n added to the exponent bits. x is first raised to -125: a masked key's -inf gives 2^-125,
# zero once rounded to half precision. Constants: -125, 1.5 x 2^23, then the coefficients of f^3 ... f^0.
EXP2_FMA_PTX = """
    max.ftz.f32 f, {x}, 0fC2FA0000;
    add.rn.ftz.f32 t, f, 0f4B400000;
    sub.rn.ftz.f32 n, t, 0f4B400000;
    sub.rn.ftz.f32 f, f, n;
    fma.rn.ftz.f32 p, f, 0f3D61FBB0, 0f3E786F0F;
    fma.rn.ftz.f32 p, p, f, 0f3F31798D;
    fma.rn.ftz.f32 p, p, f, 0f3F7FFB49;
    mov.b32 e, t;
    shl.b32 e, e, 23;
    mov.b32 bits, p;
    add.s32 bits, bits, e;
    mov.b32 {y}, bits;"""


if triton is not None:

    @triton.jit
    def _load_tile(ptr, rows, cols, stride_r, stride_c, n_rows, n_cols, MASK_ROWS: tl.constexpr, MASK_COLS: tl.constexpr):
        """ptr[rows, cols], zeros outside (n_rows, n_cols); the masks exist only where a tile can run past its edge."""
        ptrs = ptr + rows[:, None] * stride_r + cols[None, :] * stride_c
        if MASK_ROWS and MASK_COLS:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
        elif MASK_ROWS:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        elif MASK_COLS:
            tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
        else:
            tile = tl.load(ptrs)
        return tile

    # Four values per call: $0-$3 out, $4-$7 in; the first three on the special-function unit.
    EXP2_MIXED_PTX = tl.constexpr(
        "{ .reg .f32 f, t, n, p; .reg .b32 e, bits;\n"
        "ex2.approx.ftz.f32 $0, $4;\nex2.approx.ftz.f32 $1, $5;\nex2.approx.ftz.f32 $2, $6;"
        + EXP2_FMA_PTX.format(x="$7", y="$3") + "\n}")

    @triton.jit
    def _exp2_mixed(x, INTERPRET: tl.constexpr):
        """2^x, three of every four values a thread holds on the special-function unit, the fourth on the FMA units.

        Which values go where does not matter (both give 2^x), so the split follows the registers, not the columns:
        no data moves between threads.
        """
        if INTERPRET:  # no inline PTX there; tests/test_attention.py runs EXP2_FMA_PTX line by line instead
            y = tl.exp2(x)
        else:
            y = tl.inline_asm_elementwise(EXP2_MIXED_PTX, "=f,=f,=f,=f,f,f,f,f", [x], dtype=tl.float32, is_pure=True,
                                          pack=4)
        return y

    @triton.jit
    def _scores(q_a, q_b, k_ptr, keys, cols_a, cols_b, skn, skd, N, D: tl.constexpr, DB: tl.constexpr,
                EVEN_N: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr, PRECISION: tl.constexpr):
        """q k^T for one block of keys (unscaled), the head in its two chunks."""
        k_a = _load_tile(k_ptr, keys, cols_a, skn, skd, N, D, not EVEN_N, MASK_A)
        s = tl.dot(q_a, tl.trans(k_a), input_precision=PRECISION)
        if DB > 0:
            k_b = _load_tile(k_ptr, keys, cols_b, skn, skd, N, D, not EVEN_N, MASK_B)
            s = tl.dot(q_b, tl.trans(k_b), s, input_precision=PRECISION)
        return s

    @triton.jit
    def _softmax_step(s, keys, m_i, l_i, acc_a, acc_b, v_ptr, cols_a, cols_b, svn, svd, N, D: tl.constexpr,
                      DB: tl.constexpr, qk_scale, EVEN_N: tl.constexpr, MASK_A: tl.constexpr, MASK_B: tl.constexpr,
                      ONES: tl.constexpr, FMA_EXP: tl.constexpr, INTERPRET: tl.constexpr, PRECISION: tl.constexpr):
        """FlashAttention's update for one block of keys' scores s: the new running maximum and sum, and P V added to
        the output accumulated so far, rescaled to the new maximum."""
        if not EVEN_N:  # the last key block runs past N
            s = tl.where(keys[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)  # rescales what was accumulated under the old maximum
        x = s * qk_scale - m_new[:, None]  # one multiply-add per score
        p = _exp2_mixed(x, INTERPRET) if FMA_EXP else tl.exp2(x)
        if not ONES:
            l_i = l_i * alpha + tl.sum(p, 1)
        p = p.to(v_ptr.dtype.element_ty)
        v_a = _load_tile(v_ptr, keys, cols_a, svn, svd, N, D, not EVEN_N, MASK_A)
        acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=PRECISION)
        if DB > 0:
            v_b = _load_tile(v_ptr, keys, cols_b, svn, svd, N, D, not EVEN_N, MASK_B)
            if ONES:
                v_b += (cols_b[None, :] == D).to(v_b.dtype)  # loaded as 0 there; P's row sums land in column D
            acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=PRECISION)
        return m_new, l_i, acc_a, acc_b

    @triton.jit
    def _flash_forward(
        Q, K, V, O, qk_scale, H, M, N,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
        D: tl.constexpr, DA: tl.constexpr, DB: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr, ALIGN: tl.constexpr,
        FMA_EXP: tl.constexpr, PIPELINE: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One program: BLOCK_M queries of one (batch, head), all N keys. qk_scale = softmax scale x log2(e).

        ALIGN divides every stride but the head columns': at head size 40 a head starts 40 elements after the one
        before it, which Triton cannot know is a multiple of 8, and without it it neither vectorises the loads
        nor pipelines them (seen in the compiled kernel for sm_90).

        Per score the softmax costs a multiply-add, a maximum and an exponential; the exponentials run on the
        special-function unit, 16 per clock and SM on Hopper against 4096 matmul FLOPs, so at head size 40 (160
        useful FLOPs per score) they take about as long as the matmuls. When the head leaves padding columns in
        its second chunk (40 = 32 + 16), V's first padding column is loaded as ones, so the P V matmul also sums
        each row of P: no separate addition per score. With FMA_EXP, a quarter of the exponentials run on the
        FMA units instead (``_exp2_mixed``: 12 simple instructions for one of the special-function unit's, whose
        throughput is an eighth of theirs), so that neither unit waits as long for the other; the autotuner tries
        both. (Splitting the score tile by columns instead made Triton move it through shared memory.)
        (Exponentials in half precision, two per PTX instruction, do not help on sm_90: ptxas splits
        `ex2.approx.f16x2` into two `MUFU.EX2.F16`.)
        """
        pid_m = tl.program_id(0)
        b = (tl.program_id(1) // H).to(tl.int64)
        h = (tl.program_id(1) % H).to(tl.int64)
        q_ptr = Q + tl.multiple_of(b * sqb + h * sqh, ALIGN)
        k_ptr = K + tl.multiple_of(b * skb + h * skh, ALIGN)
        v_ptr = V + tl.multiple_of(b * svb + h * svh, ALIGN)
        o_ptr = O + tl.multiple_of(b * sob + h * soh, ALIGN)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols_a = tl.arange(0, DA)  # the head's columns, in two chunks; those >= D load as zeros, are never stored
        MASK_A: tl.constexpr = D < DA
        MASK_B: tl.constexpr = DA + DB > D
        ONES: tl.constexpr = DB > 0 and DA + DB > D  # a padding column of V to sum P's rows in the matmul

        q_a = _load_tile(q_ptr, rows, cols_a, sqm, sqd, M, D, True, MASK_A)  # stays in registers
        acc_a = tl.zeros([BLOCK_M, DA], dtype=tl.float32)
        if DB > 0:
            cols_b = DA + tl.arange(0, DB)
            q_b = _load_tile(q_ptr, rows, cols_b, sqm, sqd, M, D, True, MASK_B)
            acc_b = tl.zeros([BLOCK_M, DB], dtype=tl.float32)
        else:  # stand-ins, never read (every use is under `DB > 0`)
            cols_b, q_b, acc_b = cols_a, q_a, acc_a
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row maximum of the scaled scores
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running sum of exp2(scaled score - m_i)

        if PIPELINE:  # the next key block's scores are issued before this block's softmax: the two can overlap
            s = _scores(q_a, q_b, k_ptr, tl.arange(0, BLOCK_N), cols_a, cols_b, skn, skd, N, D, DB, EVEN_N, MASK_A,
                        MASK_B, PRECISION)
            for start in range(BLOCK_N, N, BLOCK_N):
                s_next = _scores(q_a, q_b, k_ptr, start + tl.arange(0, BLOCK_N), cols_a, cols_b, skn, skd, N, D, DB,
                                 EVEN_N, MASK_A, MASK_B, PRECISION)
                m_i, l_i, acc_a, acc_b = _softmax_step(
                    s, start - BLOCK_N + tl.arange(0, BLOCK_N), m_i, l_i, acc_a, acc_b, v_ptr, cols_a, cols_b, svn,
                    svd, N, D, DB, qk_scale, EVEN_N, MASK_A, MASK_B, ONES, FMA_EXP, INTERPRET, PRECISION)
                s = s_next
            last = (N - 1) // BLOCK_N * BLOCK_N
            m_i, l_i, acc_a, acc_b = _softmax_step(
                s, last + tl.arange(0, BLOCK_N), m_i, l_i, acc_a, acc_b, v_ptr, cols_a, cols_b, svn, svd, N, D, DB,
                qk_scale, EVEN_N, MASK_A, MASK_B, ONES, FMA_EXP, INTERPRET, PRECISION)
        else:
            for start in range(0, N, BLOCK_N):
                keys = start + tl.arange(0, BLOCK_N)
                s = _scores(q_a, q_b, k_ptr, keys, cols_a, cols_b, skn, skd, N, D, DB, EVEN_N, MASK_A, MASK_B,
                            PRECISION)
                m_i, l_i, acc_a, acc_b = _softmax_step(
                    s, keys, m_i, l_i, acc_a, acc_b, v_ptr, cols_a, cols_b, svn, svd, N, D, DB, qk_scale, EVEN_N,
                    MASK_A, MASK_B, ONES, FMA_EXP, INTERPRET, PRECISION)

        out_ty = O.dtype.element_ty
        rows_ok = rows[:, None] < M
        if ONES:
            l_i = tl.sum(tl.where(cols_b[None, :] == D, acc_b, 0.0), 1)
        tl.store(o_ptr + rows[:, None] * som + cols_a[None, :] * sod, (acc_a / l_i[:, None]).to(out_ty),
                 mask=rows_ok & (cols_a[None, :] < D))
        if DB > 0:
            tl.store(o_ptr + rows[:, None] * som + cols_b[None, :] * sod, (acc_b / l_i[:, None]).to(out_ty),
                     mask=rows_ok & (cols_b[None, :] < D))

    # Timed per (head size, queries, keys) at the first call of each shape in a process (not by the interpreter);
    # Triton keeps the compiled kernels on disk, so only the first process on a machine compiles all ten.
    CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "FMA_EXP": fma, "PIPELINE": pipe}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3)]
        for fma in (False, True) for pipe in (False, True)
    ]
    def _prune(configs, named_args, **kwargs):
        """The polynomial's 7.5e-5 is below half precision's rounding, not single's: no FMA_EXP in float32."""
        full = named_args["Q"].dtype == torch.float32
        return [c for c in configs if not (full and c.kwargs["FMA_EXP"])]

    _tuned = triton.autotune(CONFIGS, key=["D", "M", "N"], prune_configs_by={"early_config_prune": _prune})(
        triton.heuristics({"EVEN_N": lambda args: args["N"] % args["BLOCK_N"] == 0})(_flash_forward))

    def launch(q, k, v, scale: float, config: triton.Config | None = None) -> torch.Tensor:
        """Run the kernel on q_BHMD, k_BHND, v_BHND: under ``config`` if given, else under the autotuner's choice
        (the interpreter runs INTERPRETER_CONFIG). bench/attention_configs.py times each config this way."""
        B, H, M, D = q.shape
        N = k.shape[2]
        o = _empty_output(q)
        da, db = head_chunks(D)
        args = (q, k, v, o, scale * math.log2(math.e), H, M, N, *q.stride(), *k.stride(), *v.stride(), *o.stride())
        align = math.gcd(16, *(s for x in (q, k, v, o) for s in x.stride()[:-1]))
        consts = dict(D=D, DA=da, DB=db, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ALIGN=align,
                      INTERPRET=INTERPRETED)
        if INTERPRETED and config is None:
            config = triton.Config(INTERPRETER_CONFIG)
        if config is None:
            _tuned[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), B * H)](*args, **consts)
        else:
            meta = config.kwargs
            options = {} if INTERPRETED else dict(num_warps=config.num_warps, num_stages=config.num_stages)
            _flash_forward[(triton.cdiv(M, meta["BLOCK_M"]), B * H)](*args, **consts, **meta, **options,
                                                                      EVEN_N=N % meta["BLOCK_N"] == 0)
        return o

    @torch.library.custom_op("diffedit::attention", mutates_args=())
    def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return launch(q, k, v, scale)

    @_attention.register_fake
    def _(q, k, v, scale):
        return _empty_output(q)


def autotuned() -> list[str]:
    """The configuration the autotuner chose for each shape this process has run (its key, then the config): what
    to pin per shape once timings are in."""
    if triton is None or INTERPRETED:
        return []
    return [f"{key} -> {config}" for key, config in _tuned.cache.items()]


def _empty_output(q_BHMD: torch.Tensor) -> torch.Tensor:
    """o_BHMD stored as o_BMHD, as PyTorch's flash kernel returns it: the caller's transpose to (B, M, H x D) is free."""
    B, H, M, D = q_BHMD.shape
    return torch.empty((B, M, H, D), dtype=q_BHMD.dtype, device=q_BHMD.device).transpose(1, 2)


def attention(q_BHMD: torch.Tensor, k_BHND: torch.Tensor, v_BHND: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T x scale) v, as ``F.scaled_dot_product_attention`` without mask or dropout; scale 1/sqrt(D) by default."""
    reason = available()
    if reason:
        raise RuntimeError(f"diffedit's Triton attention cannot run here: {reason}.")
    if q_BHMD.ndim != 4 or k_BHND.shape != v_BHND.shape or q_BHMD.shape[:2] != k_BHND.shape[:2] \
            or q_BHMD.shape[3] != k_BHND.shape[3]:
        raise ValueError(f"Expected q (B, H, M, D) and k, v (B, H, N, D) but got {tuple(q_BHMD.shape)}, "
                         f"{tuple(k_BHND.shape)} and {tuple(v_BHND.shape)}.")
    if not q_BHMD.dtype == k_BHND.dtype == v_BHND.dtype:
        raise ValueError(f"q, k and v must share a dtype but are {q_BHMD.dtype}, {k_BHND.dtype} and {v_BHND.dtype}.")
    if q_BHMD.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"diffedit's Triton attention runs on CUDA tensors, not on {q_BHMD.device}; "
                         "a model on the CPU takes attention=None.")
    return _attention(q_BHMD, k_BHND, v_BHND, 1 / math.sqrt(q_BHMD.shape[3]) if scale is None else float(scale))


class TritonAttnProcessor:
    """A diffusers attention processor that runs :func:`attention` instead of SDPA.

    It computes what diffusers' ``AttnProcessor2_0`` computes for the attention layers of Stable Diffusion's
    transformer blocks (3-D hidden states, no mask, no group or spatial norm, no q/k norm), and hands any other
    layer or call to ``AttnProcessor2_0`` itself.
    """

    def __init__(self):
        from diffusers.models.attention_processor import AttnProcessor2_0

        reason = available()
        if reason:
            raise RuntimeError(f"attention='triton' cannot run here: {reason}.")
        self.fallback = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if (hidden_states.ndim != 3 or attention_mask is not None or args or kwargs or attn.spatial_norm is not None
                or attn.group_norm is not None or attn.norm_q is not None or attn.norm_k is not None):
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        B = hidden_states.shape[0]
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        q_BHMD, k_BHND, v_BHND = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
        out = attention(q_BHMD, k_BHND, v_BHND)  # the default scale, 1/sqrt(D), as AttnProcessor2_0's SDPA call
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(B, -1, out.shape[1] * out.shape[3])))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor
