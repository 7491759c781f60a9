// Prepended to every kernel file before NVRTC compiles it (kernels/src/cuda.rs). No #include: the
// kernels need nothing from a CUDA toolkit, so the machine that serves needs only the driver and
// libnvrtc, and CI checks every file with the PyPI NVRTC wheel alone.
//
// Conventions, shared with the CPU kernels (kernels/src/*.rs), which are the numerical spec:
// - activations are f32 arrays holding values exact in the compute dtype `dt` (0 f32, 1 bf16, 2 f16),
//   rounded with round_dt wherever transformers rounds;
// - weights are stored in the checkpoint's dtype (the element types below), row-major [out, in];
// - every reduction has one fixed order per output element that depends on the reduced length only,
//   never on how many rows the launch has: a row's result is the same at any batch size
//   (batch-invariant), so greedy outputs do not depend on concurrency. No atomics in reductions.

typedef unsigned int u32;
typedef unsigned long long u64;
#define DEV static __device__ __forceinline__

struct bf16 { unsigned short bits; };
struct f16 { unsigned short bits; };
struct fp8e4m3 { unsigned char bits; };
struct fp8e5m2 { unsigned char bits; };

DEV float bf16_to_f32(unsigned short b) { return __uint_as_float(((u32)b) << 16); }

// Round to nearest even; NaN stays a quiet NaN (as kernels/src/dtype.rs f32_to_bf16_bits).
DEV unsigned short f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

DEV float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

DEV unsigned short f32_to_f16(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// OCP E4M3 "fn" (torch.float8_e4m3fn): bias 7, no infinities, S.1111.111 is NaN.
DEV float fp8e4m3_to_f32(unsigned char b) {
    u32 e = (b >> 3) & 15u, m = b & 7u;
    float v;
    if (e == 0) v = (float)m * (1.0f / 512.0f);
    else if (e == 15 && m == 7) v = __uint_as_float(0x7fc00000u);
    else v = __uint_as_float(((e + 120u) << 23) | (m << 20));
    return (b & 0x80) ? -v : v;
}

// E5M2: the top byte of an IEEE half.
DEV float fp8e5m2_to_f32(unsigned char b) { return f16_to_f32((unsigned short)b << 8); }

DEV float ld(const float* p, u64 i) { return p[i]; }
DEV float ld(const bf16* p, u64 i) { return bf16_to_f32(p[i].bits); }
DEV float ld(const f16* p, u64 i) { return f16_to_f32(p[i].bits); }
DEV float ld(const fp8e4m3* p, u64 i) { return fp8e4m3_to_f32(p[i].bits); }
DEV float ld(const fp8e5m2* p, u64 i) { return fp8e5m2_to_f32(p[i].bits); }

// Rounds to the compute dtype, returned as f32 (kernels/src/dtype.rs DType::round).
DEV float round_dt(float x, int dt) {
    if (dt == 1) return bf16_to_f32(f32_to_bf16(x));
    if (dt == 2) return f16_to_f32(f32_to_f16(x));
    return x;
}

// Sum over a warp in a fixed butterfly order: every lane ends with the same bits.
DEV float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

DEV float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (at most 32 warps): each warp's sum, then the warps' sums in warp order, the
// same on every thread. Every thread of the block must call it.
DEV float block_sum(float v, float* scratch) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int w = 0; w < warps; w++) t = __fadd_rn(t, scratch[w]);
    __syncthreads();
    return t;
}

// tanh-approximated GELU in PyTorch's operation order, tanh in double rounded once
// (kernels/src/ops.rs gelu_tanh).
DEV float gelu_tanh(float x) {
    const float beta = 0.7978845608028654f;
    const float kappa = 0.044715f;
    float x_cube = __fmul_rn(__fmul_rn(x, x), x);
    float inner = __fmul_rn(beta, __fadd_rn(x, __fmul_rn(kappa, x_cube)));
    float t = (float)tanh((double)inner);
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, t));
}
