// SCE (`amalgam_core::methods::sce`): the variance selection runs through select.cu with slot
// 0 in ORDER_VAR (its cut in models[0].cut); these kernels count the non-zero variances, sum the
// masked squared task vectors per REDUCE_CHUNK chunk, and merge.

#define SEL_ALL 0
#define SEL_NONE 1
#define SEL_TOP 2

// Task-vector values of every model at j (and the base value in *b); the variance key when
// `sel` is SEL_TOP decides whether j is selected.
template <int MAXN>
__device__ __forceinline__ bool sce_load(const GtaModel* m, const GtaArgs& a, int sel, u64 j,
                                         float* b, float (&d)[MAXN]) {
    int n = a.n_models;
    *b = load_elem((const void*)a.base, a.base_dt, j);
#pragma unroll
    for (int i = 0; i < MAXN; i++)
        d[i] = i < n ? load_elem((const void*)m[i].ptr, m[i].dt, j) - *b : 0.0f;
    if (sel == SEL_ALL) return true;
    if (sel == SEL_NONE) return false;
    u32 key = var_key_of(d, n < MAXN ? n : MAXN);
    return ((((u64)key) << 32) | j) < m[0].cut;
}

// count[0] += the elements whose f32 variance is not zero.
template <int MAXN>
__device__ __forceinline__ void sce_nonzero_body(const GtaModel* m, GtaArgs a,
                                                 unsigned long long* count) {
    u64 c = 0;
    GRID_STRIDE(j, a.n) {
        float b, d[MAXN];
        sce_load<MAXN>(m, a, SEL_ALL, j, &b, d);
        c += var_key_of(d, a.n_models < MAXN ? a.n_models : MAXN) != 0xffffffffu;
    }
    for (int off = 16; off > 0; off >>= 1) c += __shfl_down_sync(0xffffffffu, c, off);
    if ((threadIdx.x & 31) == 0 && c) atomicAdd(count, (unsigned long long)c);
}

// One warp per REDUCE_CHUNK chunk: per model, the selected squared task-vector values summed
// sequentially in f64 from 0 (`ChunkedSum`), into partials[chunk * n_models + i]. The lanes
// load 32 consecutive elements at a time (coalesced) and leave their f64 products in shared
// memory; lane i then adds model i's 32 products in element order, so every sum is the CPU's
// sequence of additions (an unselected element adds +0.0, as on the CPU). Non-finite inputs are
// noted (slot 0 the base, 1 + i model i). Blocks of 32 * SEQ_WARPS threads.
template <int MAXN>
__device__ __forceinline__ void sce_sq_body(const GtaModel* m, GtaArgs a, int sel, u64 chunk,
                                            double* partials) {
    // [model][element of the tile], padded so that lane i's reads of row i and the lanes'
    // writes of one row each fall in distinct banks.
    __shared__ double tiles[SEQ_WARPS][MAXN][33];
    int n = a.n_models;
    u64* bad = (u64*)a.bad;
    int lane = threadIdx.x & 31;
    double(*t)[33] = tiles[threadIdx.x >> 5];
    u64 chunks = (a.n + chunk - 1) / chunk;
    WARP_STRIDE(c, chunks) {
        u64 lo = c * chunk;
        u64 hi = lo + chunk < a.n ? lo + chunk : a.n;
        double acc = 0.0;
        for (u64 j0 = lo; j0 < hi; j0 += 32) {
            u64 j = j0 + lane;
            if (j < hi) {
                float b, d[MAXN];
                bool on = sce_load<MAXN>(m, a, sel, j, &b, d);
                note_nonfinite(bad, 0, b, j);
#pragma unroll
                for (int i = 0; i < MAXN; i++) {
                    if (i < n) {
                        note_nonfinite(bad, 1 + i, load_elem((const void*)m[i].ptr, m[i].dt, j), j);
                        t[i][lane] = on ? (double)d[i] * (double)d[i] : 0.0;
                    }
                }
            }
            __syncwarp();
            if (lane < n) {
                if (hi - j0 >= 32) {
#pragma unroll
                    for (int k = 0; k < 32; k++) acc += t[lane][k];
                } else {
                    for (int k = 0; k < (int)(hi - j0); k++) acc += t[lane][k];
                }
            }
            __syncwarp();
        }
        if (lane < n) partials[c * n + lane] = acc;
    }
}

// out = base + num / max(den, 1e-6) over the models agreeing with the elected sign (the sum's
// sign, + at zero), weights in models[i].weight; unselected elements keep the base.
template <int MAXN>
__device__ __forceinline__ void sce_merge_body(const GtaModel* m, GtaArgs a, int sel) {
    int n = a.n_models;
    GRID_STRIDE(j, a.n) {
        float b, d[MAXN];
        bool on = sce_load<MAXN>(m, a, sel, j, &b, d);
        float y = b;
        if (on) {
            float s = 0.0f;
#pragma unroll
            for (int i = 0; i < MAXN; i++)
                if (i < n) s += d[i];
            bool positive = s >= 0.0f;
            float num = 0.0f, den = 0.0f;
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
                if (i < n && ((positive && d[i] > 0.0f) || (!positive && d[i] < 0.0f))) {
                    num += d[i] * m[i].weight;
                    den += m[i].weight;
                }
            }
            y = b + num / fmaxf(den, 1e-6f);
        }
        store_elem((void*)a.out, a.out_dt, j, y);
    }
}

#define SCE_INSTANCE(N)                                                                      \
    extern "C" __global__ void sce_nonzero_##N(const GtaModel* m, GtaArgs a,                 \
                                               unsigned long long* count) {                  \
        sce_nonzero_body<N>(m, a, count);                                                    \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(32 * SEQ_WARPS)                         \
        sce_sq_##N(const GtaModel* m, GtaArgs a, int sel, u64 chunk, double* partials) {     \
        sce_sq_body<N>(m, a, sel, chunk, partials);                                          \
    }                                                                                        \
    extern "C" __global__ void sce_merge_##N(const GtaModel* m, GtaArgs a, int sel) {        \
        sce_merge_body<N>(m, a, sel);                                                        \
    }
SCE_INSTANCE(4)
SCE_INSTANCE(8)
SCE_INSTANCE(16)
