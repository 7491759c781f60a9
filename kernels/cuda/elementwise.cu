// Row-wise and element-wise kernels: RMSNorm, residual adds, the embedding, RoPE, GELU gating and
// the final soft-cap. Each mirrors the CPU kernel named beside it (kernels/src/ops.rs).

// Gemma 4 RMSNorm of each `dim`-wide row (rows, or heads within rows): x * 1/sqrt(mean(x^2) + eps),
// times `w` when given (no 1 + w), rounded. One block per row; in place is allowed (out == x).
// (ops::rms_norm_row)
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int dim, float eps, int dt) {
    __shared__ float scratch[32];
    const float* xr = x + (u64)blockIdx.x * dim;
    float* o = out + (u64)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s = __fadd_rn(s, __fmul_rn(xr[i], xr[i]));
    s = block_sum(s, scratch);
    const float inv = __frcp_rn(__fsqrt_rn(__fadd_rn(__fdiv_rn(s, (float)dim), eps)));
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = __fmul_rn(xr[i], inv);
        if (w) v = __fmul_rn(v, w[i]);
        o[i] = round_dt(v, dt);
    }
}

// a = round(a + b) (ops::add_assign).
extern "C" __global__ void add_round(float* a, const float* b, u64 n, int dt) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        a[i] = round_dt(__fadd_rn(a[i], b[i]), dt);
}

// x = round(x * s): the layer scalar.
extern "C" __global__ void scale_round(float* x, float s, u64 n, int dt) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = round_dt(__fmul_rn(x[i], s), dt);
}

// Each `cols`-wide row times `w` then `s`, rounded after each: the router's input,
// round(round(z * scale) * hidden^-0.5) (model/router.rs).
extern "C" __global__ void mul_cols_scale_round(float* x, const float* w, float s, int cols, u64 n, int dt) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = round_dt(__fmul_rn(round_dt(__fmul_rn(x[i], w[i % cols]), dt), s), dt);
}

// Embedding rows times the (dtype-rounded) scale; the host maps placeholder ids to the pad id first
// (model/embedding.rs). One block per row.
template <typename W>
DEV void embed(const W* table, const int* ids, float* out, int hidden, float scale, int dt) {
    const u64 id = (u64)ids[blockIdx.x];
    float* o = out + (u64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = round_dt(__fmul_rn(ld(table, id * hidden + i), scale), dt);
}
extern "C" __global__ void embed_bf16(const bf16* t, const int* ids, float* o, int h, float s, int dt) { embed(t, ids, o, h, s, dt); }
extern "C" __global__ void embed_f16(const f16* t, const int* ids, float* o, int h, float s, int dt) { embed(t, ids, o, h, s, dt); }
extern "C" __global__ void embed_f32(const float* t, const int* ids, float* o, int h, float s, int dt) { embed(t, ids, o, h, s, dt); }

// Neox-style RoPE on `heads` heads of 2*half dims per row, at the row's position: cos and sin of
// pos * inv_freq in double, rounded to f32 and then to the dtype; x1' = x1 cos - x2 sin,
// x2' = x2 cos + x1 sin, each product and sum rounded (ops::Rope). Zero inv_freq entries leave their
// dims unrotated (proportional RoPE). One block per row; each thread owns whole (i, i + half) pairs.
extern "C" __global__ void rope(float* x, const int* pos, const float* inv_freq, int heads, int half, int dt) {
    float* row = x + (u64)blockIdx.x * heads * 2 * half;
    const float p = (float)pos[blockIdx.x];
    for (int j = threadIdx.x; j < heads * half; j += blockDim.x) {
        const int h = j / half, i = j % half;
        const float a = __fmul_rn(p, inv_freq[i]);
        const float c = round_dt((float)cos((double)a), dt), s = round_dt((float)sin((double)a), dt);
        float* hp = row + h * 2 * half;
        const float x1 = hp[i], x2 = hp[i + half];
        hp[i] = round_dt(__fadd_rn(round_dt(__fmul_rn(x1, c), dt), round_dt(__fmul_rn(-x2, s), dt)), dt);
        hp[i + half] = round_dt(__fadd_rn(round_dt(__fmul_rn(x2, c), dt), round_dt(__fmul_rn(x1, s), dt)), dt);
    }
}

// out = round(round(gelu_tanh(gate)) * up) (ops::gelu_mul).
extern "C" __global__ void gelu_mul(const float* gate, const float* up, float* out, u64 n, int dt) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = round_dt(__fmul_rn(round_dt(gelu_tanh(gate[i]), dt), up[i]), dt);
}

// The same over the experts' fused projection: row r of `gu` is [gate (inter) | up (inter)], and
// row r of `out` is `inter` wide (model/experts.rs).
extern "C" __global__ void gelu_gate_up(const float* gu, float* out, int inter, u64 rows, int dt) {
    const u64 n = rows * inter;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / inter, c = i % inter;
        const float g = gu[r * 2 * inter + c], u = gu[r * 2 * inter + inter + c];
        out[i] = round_dt(__fmul_rn(round_dt(gelu_tanh(g), dt), u), dt);
    }
}

// Final logit soft-cap: round(round(tanh(round(x / cap))) * cap) (ops::softcap).
extern "C" __global__ void softcap(float* x, float cap, u64 n, int dt) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float t = (float)tanh((double)round_dt(__fdiv_rn(x[i], cap), dt));
        x[i] = round_dt(__fmul_rn(round_dt(t, dt), cap), dt);
    }
}
