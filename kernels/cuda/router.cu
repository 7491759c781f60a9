// The MoE router's selection (model/router.rs): per row of expert logits, softmax in f32 (exp in
// double of x - max, rounded; the sum in PyTorch's vectorised order, ops::torch_vec_reduce_sum), the
// top k, each divided by the top k's sum (in selection order) and times its per_expert_scale.
//
// Ties at the k-th place: torch.topk's pick follows libstdc++'s selection algorithm
// (kernels/src/topk.rs); here the lower expert id wins, so in a row whose k-th and (k+1)-th
// probabilities are exactly equal the GPU may pick the other expert (docs/gpu.md). The slot order does not matter to the
// output (contributions are combined in expert-id order), only which experts are picked.
//
// One thread per row: E is small (128 for the published model; at most 256 here, the host checks).

#define MAX_EXPERTS 256

extern "C" __global__ void router_topk(const float* logits, const float* per_expert_scale, int* ids, float* weights, int rows, int E, int k) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const float* l = logits + (u64)r * E;
    float p[MAX_EXPERTS];
    float mx = -__int_as_float(0x7f800000);
    for (int e = 0; e < E; e++) mx = fmaxf(mx, l[e]);
    for (int e = 0; e < E; e++) p[e] = (float)exp((double)__fsub_rn(l[e], mx));
    float sum;
    if (E < 8) {
        sum = p[0];
        for (int e = 1; e < E; e++) sum = __fadd_rn(sum, p[e]);
    } else {
        float acc[8];
        for (int j = 0; j < 8; j++) acc[j] = p[j];
        for (int e = 8; e < E; e += 8)
            for (int j = 0; j < 8 && e + j < E; j++) acc[j] = __fadd_rn(acc[j], p[e + j]);
        for (int w = 4; w >= 1; w >>= 1)
            for (int j = 0; j < w; j++) acc[j] = __fadd_rn(acc[j], acc[j + w]);
        sum = acc[0];
    }
    const float inv = __frcp_rn(sum);
    for (int e = 0; e < E; e++) p[e] = __fmul_rn(p[e], inv);
    // Top k by value, the lower id first among equals; picked entries are marked with -1.
    int pick[MAX_EXPERTS < 64 ? MAX_EXPERTS : 64];
    float top = 0.0f;
    for (int s = 0; s < k; s++) {
        int best = -1;
        for (int e = 0; e < E; e++)
            if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
        // NaN probabilities (NaN logits) compare false everywhere: take the lowest id not yet picked,
        // so the pick stays in range (the CPU's top-k orders NaN first).
        for (int e = 0; best < 0 && e < E; e++)
            if (p[e] != -1.0f) best = e;
        pick[s] = best;
        top = __fadd_rn(top, p[best]);
        ids[(u64)r * k + s] = best;
        weights[(u64)r * k + s] = p[best];
        p[best] = -1.0f;
    }
    for (int s = 0; s < k; s++) {
        const u64 o = (u64)r * k + s;
        weights[o] = __fmul_rn(__fdiv_rn(weights[o], top), per_expert_scale[pick[s]]);
    }
}
