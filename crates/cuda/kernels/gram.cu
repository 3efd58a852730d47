// The Gram-based methods (slerp, nuslerp, multislerp, karcher): Gram matrices of the vectors
// x_i = input_i - base (f32; the input itself without a base) per group, then
// out = sum_i c_i x_i (+ base) with per-group coefficients, in f32, input order.

// One input of the Gram kernels (layout shared with `amalgam_cuda::gram::GramInput`).
struct GramInput {
    u64 ptr;
    int dt;
    int pad;
};

struct GramArgs {
    u64 base;      // 0: none
    u64 n;         // elements
    u64 cols;      // row length (per-row grouping)
    u64 bad;       // u64[n_in + 1]: non-finite flags (inputs, then the base)
    int base_dt;
    int n_in;
};

// x_i at element j for every input (minus the base), noting non-finite values.
template <int N>
__device__ __forceinline__ void gram_load(const GramInput* in, const GramArgs& a, u64 j,
                                          float x[N]) {
    u64* bad = (u64*)a.bad;
    float b = 0.0f;
    if (a.base) {
        b = load_elem((const void*)a.base, a.base_dt, j);
        note_nonfinite(bad, a.n_in, b, j);
    }
#pragma unroll
    for (int i = 0; i < N; i++) {
        if (i < a.n_in) {
            float v = load_elem((const void*)in[i].ptr, in[i].dt, j);
            note_nonfinite(bad, i, v, j);
            x[i] = a.base ? v - b : v;
        }
    }
}

// Pair sums over segments, one thread per segment, each summed sequentially in element order
// from 0.0 in f64, exactly as the CPU does: a whole-tensor segment is a `ChunkedSum` chunk
// (REDUCE_CHUNK elements; the host then adds the segments in order), a per-row segment is a
// row. out[segment * P + p], p numbering the pairs (i <= k) of N in row-major order.
template <int N>
__device__ __forceinline__ void gram_seq(const GramInput* in, GramArgs a, u64 seg_len,
                                         double* out) {
    const int P = N * (N + 1) / 2;
    int n_in = a.n_in;
    u64 segs = (a.n + seg_len - 1) / seg_len;
    GRID_STRIDE(t, segs) {
        double acc[P];
#pragma unroll
        for (int p = 0; p < P; p++) acc[p] = 0.0;
        u64 hi = (t + 1) * seg_len < a.n ? (t + 1) * seg_len : a.n;
        for (u64 j = t * seg_len; j < hi; j++) {
            float x[N];
            gram_load<N>(in, a, j, x);
            int p = 0;
#pragma unroll
            for (int i = 0; i < N; i++) {
#pragma unroll
                for (int k = i; k < N; k++) {
                    if (i < n_in && k < n_in) acc[p] += (double)x[i] * (double)x[k];
                    p++;
                }
            }
        }
#pragma unroll
        for (int p = 0; p < P; p++) out[t * P + p] = acc[p];
    }
}

#define GRAM_INSTANCE(N)                                                                     \
    extern "C" __global__ void gram_seq_##N(const GramInput* in, GramArgs a, u64 seg_len,    \
                                            double* out) {                                   \
        gram_seq<N>(in, a, seg_len, out);                                                    \
    }
GRAM_INSTANCE(2)
GRAM_INSTANCE(4)
GRAM_INSTANCE(8)

// out = sum_i coefs[g * n_in + i] * x_i (+ base), g = 0 (whole) or j / cols (rows); with
// `stock` (model stock, base required): t * (sum_i input_i / n_in) + (1 - t) * base, t = coefs[g *
// n_in].
extern "C" __global__ void gram_combine(const GramInput* in, GramArgs a, const float* coefs,
                                        int rows, int stock, void* out, int out_dt) {
    GRID_STRIDE(j, a.n) {
        float b = a.base ? load_elem((const void*)a.base, a.base_dt, j) : 0.0f;
        const float* c = coefs + (rows ? (j / a.cols) * a.n_in : 0);
        if (stock) {
            float s = 0.0f;
            for (int i = 0; i < a.n_in; i++) s += load_elem((const void*)in[i].ptr, in[i].dt, j);
            float t = c[0];
            store_elem(out, out_dt, j, t * (s / (float)a.n_in) + (1.0f - t) * b);
            continue;
        }
        float acc = 0.0f;
        for (int i = 0; i < a.n_in; i++) {
            float v = load_elem((const void*)in[i].ptr, in[i].dt, j);
            float x = a.base ? v - b : v;
            acc += c[i] * x;
        }
        if (a.base) acc += b;
        store_elem(out, out_dt, j, acc);
    }
}
