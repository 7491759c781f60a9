// Attention over the paged KV cache, for decode rows and prefill rows alike, and the cache writes.
//
// Cache layout, per layer: k_pool and v_pool are [blocks, block_size, kv_heads, head_dim] in the KV
// dtype; a sequence's position j lives in block block_table[seq][j / block_size], slot
// j % block_size (the engine's block tables, unchanged).
//
// A row at position `pos` of sequence `seq` attends to keys [from, to): from = pos + 1 - window on
// sliding layers (0 on full ones), to = pos + 1, or on sliding layers the end of the image the row
// sits in (`sees_to`: transformers' bidirectional image blocks). Scale 1.0 (q_norm and k_norm take
// its place), no soft-cap.
//
// One block of 4 warps per (row, head); warp w takes keys from + w, from + w + 4, ...; each lane holds
// head_dim / 32 elements (lane + 32 i); the warps' partial results are merged in warp order. The order
// depends on the row's keys only: the result is the same whatever else is in the batch and whether the
// keys came from the prefix cache. This plain version reads the keys twice; a split-KV (flash-decoding)
// version for long contexts must keep a fixed split that does not depend on the batch.

#define ATTN_WARPS 4

DEV unsigned char f32_to_fp8e4m3(float f) {
    const unsigned char sign = (unsigned char)((__float_as_uint(f) >> 24) & 0x80u);
    const float a = fabsf(f);
    if (a != a) return sign | 0x7f;
    if (a >= 464.0f) return sign | 0x7e;  // saturate to 448, as vLLM's conversion does
    if (a < 0.015625f) return sign | (unsigned char)rintf(a * 512.0f);  // subnormals (8 is 2^-6)
    const u32 u = __float_as_uint(a);
    const u32 r = u + 0x7ffffu + ((u >> 20) & 1u);
    return sign | (unsigned char)((((r >> 23) - 120u) << 3) | ((r >> 20) & 7u));
}

DEV unsigned char f32_to_fp8e5m2(float f) {
    const unsigned char sign = (unsigned char)((__float_as_uint(f) >> 24) & 0x80u);
    const float a = fabsf(f);
    if (a != a) return sign | 0x7e;  // as kv.rs encodes NaN in E5M2
    if (a >= 61440.0f) return sign | 0x7b;  // saturate to 57344
    if (a < 6.103515625e-05f) return sign | (unsigned char)rintf(a * 65536.0f);
    const u32 u = __float_as_uint(a);
    const u32 r = u + 0xfffffu + ((u >> 21) & 1u);
    return sign | (unsigned char)((((r >> 23) - 112u) << 2) | ((r >> 21) & 3u));
}

DEV void st(float* p, u64 i, float v) { p[i] = v; }
DEV void st(bf16* p, u64 i, float v) { p[i].bits = f32_to_bf16(v); }
DEV void st(f16* p, u64 i, float v) { p[i].bits = f32_to_f16(v); }
DEV void st(fp8e4m3* p, u64 i, float v) { p[i].bits = f32_to_fp8e4m3(v); }
DEV void st(fp8e5m2* p, u64 i, float v) { p[i].bits = f32_to_fp8e5m2(v); }

// Stores rows of keys and values ([rows, kv_heads * head_dim]) at their cache slots
// (block * block_size + offset). One block per row.
template <typename KV>
DEV void kv_write(const float* k, const float* v, KV* k_pool, KV* v_pool, const int* slots, int width) {
    const u64 row = blockIdx.x, at = (u64)slots[row] * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) {
        st(k_pool, at + i, k[row * width + i]);
        st(v_pool, at + i, v[row * width + i]);
    }
}

// The score of key j: round(round(q . k_j) * scale), as kernels/src/attention.rs rounds it.
template <typename KV, int NPL>
DEV float score(const float* qv, const KV* k_pool, u64 base, int head_dim, float scale, int dt) {
    const int lane = threadIdx.x & 31;
    float s = 0.0f;
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        if (d < head_dim) s = __fadd_rn(s, __fmul_rn(qv[i], ld(k_pool, base + d)));
    }
    return round_dt(__fmul_rn(round_dt(warp_sum(s), dt), scale), dt);
}

// Two passes over the row's keys, as eager attention computes: the softmax's max and sum, then
// p_j = round(exp(s_j - max) / sum) in the compute dtype (transformers casts the probabilities
// before p @ v) and out = round(sum_j p_j v_j). exp in double, rounded once (ops::softmax).
template <typename KV, int NPL>
DEV void attend(const float* q, const KV* k_pool, const KV* v_pool, const int* block_tables, int max_blocks,
                const int* row_seq, const int* row_pos, const int* row_sees_to, int window, int heads, int kv_heads,
                int head_dim, int block_size, float* out, int dt) {
    __shared__ float s_m[ATTN_WARPS], s_l[ATTN_WARPS];
    __shared__ float s_acc[ATTN_WARPS][NPL * 32];
    const int task = blockIdx.x, row = task / heads, head = task % heads;
    const int kvh = head / (heads / kv_heads);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int pos = row_pos[row];
    const int from = window > 0 ? max(0, pos + 1 - window) : 0;
    const int to = window > 0 ? row_sees_to[row] : pos + 1;
    const int* table = block_tables + (u64)row_seq[row] * max_blocks;
    const float* qh = q + (u64)task * head_dim;
    float qv[NPL], acc[NPL];
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        qv[i] = d < head_dim ? qh[d] : 0.0f;
        acc[i] = 0.0f;
    }
#define KEY_BASE(j) ((((u64)table[(j) / block_size] * block_size + (j) % block_size) * kv_heads + kvh) * head_dim)
    // Pass 1: each warp's running max and sum of exp over its keys, then merged in warp order.
    float m = -__int_as_float(0x7f800000), l = 0.0f;
    for (int j = from + warp; j < to; j += ATTN_WARPS) {
        const float s = score<KV, NPL>(qv, k_pool, KEY_BASE(j), head_dim, 1.0f, dt);
        if (s > m) {
            l = __fadd_rn(__fmul_rn(l, (float)exp((double)__fsub_rn(m, s))), 1.0f);
            m = s;
        } else {
            l = __fadd_rn(l, (float)exp((double)__fsub_rn(s, m)));
        }
    }
    if (lane == 0) { s_m[warp] = m; s_l[warp] = l; }
    __syncthreads();
    float mx = s_m[0];
    for (int w = 1; w < ATTN_WARPS; w++) mx = fmaxf(mx, s_m[w]);
    float sum = 0.0f;
    for (int w = 0; w < ATTN_WARPS; w++)
        if (s_l[w] > 0.0f) sum = __fadd_rn(sum, __fmul_rn(s_l[w], (float)exp((double)__fsub_rn(s_m[w], mx))));
    const float inv = __frcp_rn(sum);
    // Pass 2: the rounded probabilities times V, per warp, then the warps' sums in warp order.
    for (int j = from + warp; j < to; j += ATTN_WARPS) {
        const u64 base = KEY_BASE(j);
        const float s = score<KV, NPL>(qv, k_pool, base, head_dim, 1.0f, dt);
        const float p = round_dt(__fmul_rn((float)exp((double)__fsub_rn(s, mx)), inv), dt);
        for (int i = 0; i < NPL; i++) {
            const int d = lane + 32 * i;
            if (d < head_dim) acc[i] = __fadd_rn(acc[i], __fmul_rn(p, ld(v_pool, base + d)));
        }
    }
#undef KEY_BASE
    for (int i = 0; i < NPL; i++) s_acc[warp][lane + 32 * i] = acc[i];
    __syncthreads();
    if (warp != 0) return;
    float* oh = out + (u64)task * head_dim;
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        float o = 0.0f;
        for (int w = 0; w < ATTN_WARPS; w++) o = __fadd_rn(o, s_acc[w][lane + 32 * i]);
        if (d < head_dim) oh[d] = round_dt(o, dt);
    }
}

#define ATTEND(NAME, KV, NPL)                                                                                      \
    extern "C" __global__ void NAME(const float* q, const KV* kp, const KV* vp, const int* bt, int mb, const int* rs, \
                                    const int* rp, const int* rt, int win, int h, int kvh, int hd, int bs, float* o, int dt) { \
        attend<KV, NPL>(q, kp, vp, bt, mb, rs, rp, rt, win, h, kvh, hd, bs, o, dt);                               \
    }

#define ATTEND_ALL(SUFFIX, KV)                                                                                     \
    ATTEND(attend_##SUFFIX##_32, KV, 1)                                                                            \
    ATTEND(attend_##SUFFIX##_64, KV, 2)                                                                            \
    ATTEND(attend_##SUFFIX##_128, KV, 4)                                                                           \
    ATTEND(attend_##SUFFIX##_256, KV, 8)                                                                           \
    ATTEND(attend_##SUFFIX##_512, KV, 16)                                                                          \
    extern "C" __global__ void kv_write_##SUFFIX(const float* k, const float* v, KV* kp, KV* vp, const int* slots, int width) { \
        kv_write(k, v, kp, vp, slots, width);                                                                      \
    }

ATTEND_ALL(f32, float)
ATTEND_ALL(bf16, bf16)
ATTEND_ALL(f16, f16)
ATTEND_ALL(fp8e4m3, fp8e4m3)
ATTEND_ALL(fp8e5m2, fp8e5m2)
