// Linear products, y[m, n] = round(sum_k x[m, k] * w[n, k]), for the dense projections, the router,
// the lm_head and the experts. The CPU kernels (kernels/src/linear.rs) are the spec.
//
// Order of the sum, per output element: lane l of a warp takes k = 8*l + 256*i + j (j = 0..7, then i),
// accumulating in f32 with separate multiply and add (no contraction, as the CPU's portable path); the
// 32 lane sums are then added by the butterfly of warp_sum. The order depends on K only: the same for a
// row whatever the batch around it (batch-invariant), with no split-K and no atomics. K % 8 == 0 and
// 16-byte aligned rows are required (the host checks).
//
// This is the first, plain version: warps read weight rows straight from memory, which is what decode
// at small batch wants; tensor-core tiles for prefill keep the same per-element order or come behind a
// flag.

#define WARPS 8
#define MT 4

DEV void load8(const bf16* p, float* v) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const u32 u[4] = {q.x, q.y, q.z, q.w};
    for (int j = 0; j < 4; j++) {
        v[2 * j] = __uint_as_float(u[j] << 16);
        v[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
}

DEV void load8(const f16* p, float* v) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    const u32 u[4] = {q.x, q.y, q.z, q.w};
    for (int j = 0; j < 4; j++) {
        v[2 * j] = f16_to_f32((unsigned short)(u[j] & 0xffffu));
        v[2 * j + 1] = f16_to_f32((unsigned short)(u[j] >> 16));
    }
}

DEV void load8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// acc[r] = sum over k of xs[r][k] * w[k], for r < rows (at most MT), in the order described above.
template <typename W>
DEV void warp_dot(const float* const* xs, int rows, const W* w, int K, float* acc) {
    const int lane = threadIdx.x & 31;
    float part[MT];
    for (int r = 0; r < MT; r++) part[r] = 0.0f;
    for (int k = 8 * lane; k < K; k += 256) {
        float wv[8];
        load8(w + k, wv);
        for (int r = 0; r < MT; r++) {
            if (r < rows) {
                float xv[8];
                load8(xs[r] + k, xv);
                for (int j = 0; j < 8; j++) part[r] = __fadd_rn(part[r], __fmul_rn(xv[j], wv[j]));
            }
        }
    }
    for (int r = 0; r < MT; r++) acc[r] = warp_sum(part[r]);
}

// x [M, K], w [N, K], out [M, N]. Grid (ceil(N / WARPS), ceil(M / MT)), block 32 * WARPS.
template <typename W>
DEV void linear(const float* x, const W* w, float* out, int M, int N, int K, int dt) {
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int m0 = blockIdx.y * MT;
    if (n >= N) return;
    const int rows = min(MT, M - m0);
    const float* xs[MT];
    for (int r = 0; r < MT; r++) xs[r] = x + (u64)(m0 + min(r, rows - 1)) * K;
    float acc[MT];
    warp_dot(xs, rows, w + (u64)n * K, K, acc);
    if ((threadIdx.x & 31) == 0)
        for (int r = 0; r < rows; r++) out[(u64)(m0 + r) * N + n] = round_dt(acc[r], dt);
}

extern "C" __global__ void linear_bf16(const float* x, const bf16* w, float* o, int M, int N, int K, int dt) { linear(x, w, o, M, N, K, dt); }
extern "C" __global__ void linear_f16(const float* x, const f16* w, float* o, int M, int N, int K, int dt) { linear(x, w, o, M, N, K, dt); }
extern "C" __global__ void linear_f32(const float* x, const float* w, float* o, int M, int N, int K, int dt) { linear(x, w, o, M, N, K, dt); }

// Per routed (row, slot) pair p: out[p, n] = round(x[p / x_div] . w[ids[p]][n]), times pair_scale[p]
// and rounded again when pair_scale is given (the routing weight, applied to the down projection's
// output: model/experts.rs). w holds the experts stacked, [E, N, K]. Grid (pairs, ceil(N / WARPS)):
// pairs on x, which has room for any prefill (y stops at 65535).
// Decode reads only the selected experts' rows, once per pair.
template <typename W>
DEV void expert_linear(const float* x, int x_div, const int* ids, const W* w, const float* pair_scale, float* out, int N, int K, int dt) {
    const int n = blockIdx.y * WARPS + (threadIdx.x >> 5);
    const int p = blockIdx.x;
    if (n >= N) return;
    const float* xs[MT];
    for (int r = 0; r < MT; r++) xs[r] = x + (u64)(p / x_div) * K;
    float acc[MT];
    warp_dot(xs, 1, w + ((u64)ids[p] * N + n) * K, K, acc);
    if ((threadIdx.x & 31) == 0) {
        float y = round_dt(acc[0], dt);
        if (pair_scale) y = round_dt(__fmul_rn(y, pair_scale[p]), dt);
        out[(u64)p * N + n] = y;
    }
}

extern "C" __global__ void expert_linear_bf16(const float* x, int x_div, const int* ids, const bf16* w, const float* s, float* o, int N, int K, int dt) { expert_linear(x, x_div, ids, w, s, o, N, K, dt); }
extern "C" __global__ void expert_linear_f16(const float* x, int x_div, const int* ids, const f16* w, const float* s, float* o, int N, int K, int dt) { expert_linear(x, x_div, ids, w, s, o, N, K, dt); }
extern "C" __global__ void expert_linear_f32(const float* x, int x_div, const int* ids, const float* w, const float* s, float* o, int N, int K, int dt) { expert_linear(x, x_div, ids, w, s, o, N, K, dt); }

// The step's routed pairs grouped by expert, for expert_group_linear: offsets[e]..offsets[e + 1] is
// expert e's run in `order`, which lists pair indices in ascending order within each run. One block;
// thread e scans every pair for its own expert (deterministic, no atomics). E <= blockDim.x.
extern "C" __global__ void group_pairs(const int* ids, int pairs, int E, int* offsets, int* order) {
    __shared__ int counts[1024];
    const int e = threadIdx.x;
    if (e < E) {
        int c = 0;
        for (int p = 0; p < pairs; p++) c += ids[p] == e;
        counts[e] = c;
    }
    __syncthreads();
    if (e < E) {
        int start = 0;
        for (int j = 0; j < e; j++) start += counts[j];
        offsets[e] = start;
        if (e == E - 1) offsets[E] = start + counts[e];
        int at = start;
        for (int p = 0; p < pairs; p++)
            if (ids[p] == e) order[at++] = p;
    }
}

// expert_linear over pairs grouped by expert: block (n-block, e) takes expert e's pairs MT at a time,
// so each weight row is read from memory once per step and reused from cache for the rest of the
// expert's pairs, instead of once per pair. Each output element is the same warp_dot as in
// expert_linear (a row's sum does not depend on the rows beside it), so the bits are the same.
// Grid (ceil(N / WARPS), E).
template <typename W>
DEV void expert_group_linear(const float* x, int x_div, const int* order, const int* offsets, const W* w, const float* pair_scale, float* out, int N, int K, int dt) {
    const int n = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int e = blockIdx.y;
    if (n >= N) return;
    const int begin = offsets[e], end = offsets[e + 1];
    const W* wrow = w + ((u64)e * N + n) * K;
    for (int t0 = begin; t0 < end; t0 += MT) {
        const int rows = min(MT, end - t0);
        const float* xs[MT];
        for (int r = 0; r < MT; r++) xs[r] = x + (u64)(order[t0 + min(r, rows - 1)] / x_div) * K;
        float acc[MT];
        warp_dot(xs, rows, wrow, K, acc);
        if ((threadIdx.x & 31) == 0) {
            for (int r = 0; r < rows; r++) {
                const int p = order[t0 + r];
                float y = round_dt(acc[r], dt);
                if (pair_scale) y = round_dt(__fmul_rn(y, pair_scale[p]), dt);
                out[(u64)p * N + n] = y;
            }
        }
    }
}

extern "C" __global__ void expert_group_linear_bf16(const float* x, int x_div, const int* o, const int* off, const bf16* w, const float* s, float* y, int N, int K, int dt) { expert_group_linear(x, x_div, o, off, w, s, y, N, K, dt); }
extern "C" __global__ void expert_group_linear_f16(const float* x, int x_div, const int* o, const int* off, const f16* w, const float* s, float* y, int N, int K, int dt) { expert_group_linear(x, x_div, o, off, w, s, y, N, K, dt); }
extern "C" __global__ void expert_group_linear_f32(const float* x, int x_div, const int* o, const int* off, const float* w, const float* s, float* y, int N, int K, int dt) { expert_group_linear(x, x_div, o, off, w, s, y, N, K, dt); }

// A row's expert contributions contrib[row, slot, hidden] summed in ascending expert id with a
// rounding after every add (model/experts.rs combine). One thread per (row, column).
extern "C" __global__ void moe_combine(const float* contrib, const int* ids, float* out, int rows, int k, int hidden, int dt) {
    const u64 n = (u64)rows * hidden;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / hidden, c = i % hidden;
        float acc = 0.0f;
        int last = -1;
        for (int done = 0; done < k; done++) {
            // The next slot in ascending expert id (ids of a row are distinct).
            int best = -1, best_id = 0x7fffffff;
            for (int s = 0; s < k; s++) {
                const int e = ids[r * k + s];
                if (e > last && e < best_id) { best = s; best_id = e; }
            }
            last = best_id;
            acc = round_dt(__fadd_rn(acc, contrib[(r * k + best) * hidden + c]), dt);
        }
        out[i] = acc;
    }
}
