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

// Adds element k of the shared tile to this lane's pair sums.
template <int H>
__device__ __forceinline__ void gram_step(const float (*t)[33], const int* pi, const int* pk,
                                          const bool* has, int k, double* acc) {
#pragma unroll
    for (int h = 0; h < H; h++)
        if (has[h]) acc[h] += (double)t[pi[h]][k] * (double)t[pk[h]][k];
}

// Pair sums over segments, one warp per segment, each summed sequentially in element order
// from 0.0 in f64, exactly as the CPU does: a whole-tensor segment is a `ChunkedSum` chunk
// (REDUCE_CHUNK elements; the host then adds the segments in order), a per-row segment is a
// row. out[segment * P + p], p numbering the pairs (i <= k) of N in row-major order. The lanes
// load 32 consecutive elements at a time (coalesced) into shared memory; lane p (and p + 32)
// then adds its pair's 32 products in element order. Blocks of 32 * SEQ_WARPS threads.
template <int N>
__device__ __forceinline__ void gram_seq(const GramInput* in, GramArgs a, u64 seg_len,
                                         double* out) {
    const int P = N * (N + 1) / 2;
    const int H = (P + 31) / 32;  // pairs per lane
    // [input][element of the tile], padded so that the lanes' reads of rows i and k fall in
    // distinct banks (or read one word together).
    __shared__ float tiles[SEQ_WARPS][N][33];
    int n_in = a.n_in;
    int lane = threadIdx.x & 31;
    float(*t)[33] = tiles[threadIdx.x >> 5];
    // This lane's pairs (pi[h], pk[h]), h = 0..H-1: pair lane + 32 h, if both are inputs.
    int pi[H], pk[H];
    bool has[H];
#pragma unroll
    for (int h = 0; h < H; h++) {
        int p = lane + 32 * h, q = 0;
        pi[h] = 0;
        pk[h] = 0;
        for (int i = 0; i < N; i++)
            for (int k = i; k < N; k++, q++)
                if (q == p) {
                    pi[h] = i;
                    pk[h] = k;
                }
        has[h] = p < P && pk[h] < n_in;
    }
    u64 segs = (a.n + seg_len - 1) / seg_len;
    WARP_STRIDE(s, segs) {
        u64 lo = s * seg_len;
        u64 hi = lo + seg_len < a.n ? lo + seg_len : a.n;
        double acc[H];
#pragma unroll
        for (int h = 0; h < H; h++) acc[h] = 0.0;
        for (u64 j0 = lo; j0 < hi; j0 += 32) {
            u64 j = j0 + lane;
            if (j < hi) {
                float x[N];
                gram_load<N>(in, a, j, x);
#pragma unroll
                for (int i = 0; i < N; i++)
                    if (i < n_in) t[i][lane] = x[i];
            }
            __syncwarp();
            int cnt = hi - j0 < 32 ? (int)(hi - j0) : 32;
            // The element loop outside the pairs' loop, which unrolls whole so acc stays in
            // registers (each pair still adds in element order).
            if (cnt == 32) {
#pragma unroll
                for (int k = 0; k < 32; k++) gram_step<H>(t, pi, pk, has, k, acc);
            } else {
                for (int k = 0; k < cnt; k++) gram_step<H>(t, pi, pk, has, k, acc);
            }
            __syncwarp();
        }
#pragma unroll
        for (int h = 0; h < H; h++)
            if (lane + 32 * h < P) out[s * P + lane + 32 * h] = acc[h];
    }
}

#define GRAM_INSTANCE(N)                                                                     \
    extern "C" __global__ void __launch_bounds__(32 * SEQ_WARPS)                             \
        gram_seq_##N(const GramInput* in, GramArgs a, u64 seg_len, double* out) {            \
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
