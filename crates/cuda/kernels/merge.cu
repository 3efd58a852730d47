// Elementwise merge kernels: linear / task arithmetic over all inputs in one pass, and the
// generalized task arithmetic pipeline (TIES, DARE, task arithmetic, Breadcrumbs, DELLA) fused
// per element; DELLA's per-group ranks (`della_ranks`, at the end) for rank groups of any shape.
// Per element they perform the f32 operations of the CPU path in the same order (compiled with
// --fmad=false), so results are bit-identical to it.

// One input of `linear_merge` (layout shared with `amalgam_cuda::merge::LinInput`).
struct LinInput {
    u64 ptr;
    float w;
    int dt;
};

// The inputs of `linear_merge_2/4/8`, passed by value: in the kernel's parameter space they
// are operands of the loop's instructions, not registers or loads (layout shared with
// `amalgam_cuda::merge::LinTable`). Unused slots repeat input 0.
#define LIN_TABLE 8
struct LinTable {
    LinInput in[LIN_TABLE];
};
static_assert(sizeof(LinTable) == 128, "LinTable's layout is shared with merge.rs");

// The elements from `from` to n (fewer than 8) of `linear_merge_*`, one per thread of the
// grid's first threads; `in` is a `LinInput[n_in]` (MAXN 0: any count, else at most MAXN).
template <int MAXN, class In>
__device__ __forceinline__ void linear_tail(const In& in, int n_in, int has_div, float div, u64 n,
                                            u64 from, void* out, int out_dt, u64* bad) {
    u64 j = from + (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < n) {
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < (MAXN ? MAXN : n_in); i++) {
            if (i < n_in) {
                float v = load_elem((const void*)in[i].ptr, in[i].dt, j);
                note_nonfinite(bad, i, v, j);
                acc += v * in[i].w;
            }
        }
        if (has_div) acc /= div;
        store_elem(out, out_dt, j, acc);
    }
}

// out = sum_i x_i * w_i (input order), divided by `div` when has_div; 8 elements per thread,
// every input's loads issued before the sums. A non-finite input always makes its output
// non-finite (inf * 0 and inf - inf are NaN), so only non-finite outputs are traced back to
// their inputs. (16 elements per thread for 2-byte inputs measured slower on an H200.)
template <int MAXN>
__device__ __forceinline__ void linear_body(const LinTable& t, int n_in, int has_div, float div,
                                            u64 n, void* out, int out_dt, u64* bad) {
    u64 groups = n / 8;
    GRID_STRIDE(g, groups) {
        // Every slot is loaded (unused ones read input 0 again), so that no load waits on a
        // predicate.
        Raw<8> r[MAXN];
#pragma unroll
        for (int i = 0; i < MAXN; i++) fetch<8>((const void*)t.in[i].ptr, t.in[i].dt, g, r[i]);
        // Each input decoded as it is added (and again to trace a non-finite output), so that
        // only the raw words stay in registers.
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = 0.0f;
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_in) {
                float v[8];
                decode<8>(r[i], t.in[i].dt, v);
                float wi = t.in[i].w;
#pragma unroll
                for (int k = 0; k < 8; k++) acc[k] += v[k] * wi;
            }
        }
        if (has_div) {
#pragma unroll
            for (int k = 0; k < 8; k++) acc[k] /= div;
        }
        bool all = true;
#pragma unroll
        for (int k = 0; k < 8; k++) all &= isfinite(acc[k]);
        if (!all) {
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
                if (i < n_in) {
                    float v[8];
                    decode<8>(r[i], t.in[i].dt, v);
#pragma unroll
                    for (int k = 0; k < 8; k++) note_nonfinite(bad, i, v[k], 8 * g + k);
                }
            }
        }
        store8(out, out_dt, g, acc);
    }
    linear_tail<MAXN>(t.in, n_in, has_div, div, n, groups * 8, out, out_dt, bad);
}

#define LINEAR_INSTANCE(N)                                                                   \
    extern "C" __global__ void linear_merge_##N(LinTable t, int n_in, int has_div, float div, \
                                                u64 n, void* out, int out_dt, u64* bad) {    \
        linear_body<N>(t, n_in, has_div, div, n, out, out_dt, bad);                          \
    }
LINEAR_INSTANCE(2)
LINEAR_INSTANCE(4)
LINEAR_INSTANCE(8)

// Any number of inputs, one at a time.
extern "C" __global__ void linear_merge_any(const LinInput* in, int n_in, int has_div, float div,
                                            u64 n, void* out, int out_dt, u64* bad) {
    u64 groups = n / 8;
    GRID_STRIDE(g, groups) {
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = 0.0f;
        for (int i = 0; i < n_in; i++) {
            float v[8];
            load8((const void*)in[i].ptr, in[i].dt, g, v);
            float wi = in[i].w;
#pragma unroll
            for (int k = 0; k < 8; k++) {
                note_nonfinite(bad, i, v[k], 8 * g + k);
                acc[k] += v[k] * wi;
            }
        }
        if (has_div) {
#pragma unroll
            for (int k = 0; k < 8; k++) acc[k] /= div;
        }
        store8(out, out_dt, g, acc);
    }
    linear_tail<0>(in, n_in, has_div, div, n, groups * 8, out, out_dt, bad);
}

// One model of the pipeline (layout shared with `amalgam_cuda::merge::GtaModel`).
struct GtaModel {
    u64 ptr;        // the model's tensor
    u64 threshold;  // DARE: keep when the Philox word is below this
    u64 cut;        // magnitude: keep when (key << 32 | index) < cut
    u32 k0, k1;     // Philox key
    float weight;   // w_i
    float factor;   // L1 rescale factor (1 when none)
    float scale;    // DARE: factor of kept entries (1/density or 1)
    int dt;         // encoding
    int mask;       // MASK_*
    int order;      // selection order: ORDER_DESC (largest |d| first) or ORDER_ASC
    u64 aux;        // DELLA: u32 rank per element (1-based within its group)
    u32 group;      // DELLA: rank group length (c; any shape, see `della_ranks`)
    float dm, de;   // DELLA: f32(density - epsilon), f32(epsilon)
    int inv;        // DELLA: divide kept entries by their keep probability
};

#define MASK_NONE 0
#define MASK_RANK 1
#define MASK_DARE 2
#define MASK_OUTLIER 3
#define MASK_DELLA 4

// `amalgam_core::philox::keep_threshold` of an f32 probability (computed in f64).
__device__ __forceinline__ u64 keep_threshold_of(float p) {
    double q = (double)p;
    if (isnan(q) || q <= 0.0) return 0;
    if (q >= 1.0) return 1ull << 32;
    u64 t = (u64)floor(q * 4294967296.0);
    return t < (1ull << 32) ? t : (1ull << 32);
}

#define ORDER_DESC 0
#define ORDER_ASC 1
#define ORDER_VAR 2

// The selection key of task-vector value d: ascending keys are descending magnitudes
// (ORDER_DESC: ~bits(|d|)) or ascending ones (ORDER_ASC: bits(|d|) with the top bit set, so
// that every key has it). Equal magnitudes are ordered by flat index either way.
__device__ __forceinline__ u32 order_key(float d, int order) {
    u32 m = __float_as_uint(d) & 0x7fffffffu;
    return order == ORDER_ASC ? (m | 0x80000000u) : ~m;
}

#define CONS_NONE 0
#define CONS_SUM 1
#define CONS_COUNT 2

struct GtaArgs {
    u64 base;        // base tensor
    u64 out;         // output
    u64 n;           // elements
    u64 name_hash;   // FNV-1a 64 of the tensor name (DARE counters)
    u64 bad;         // u64[1 + n_models]: lowest non-finite index per input
    int base_dt, out_dt, n_models, consensus;
    int strict, zero_pos, normalize, any_order;
    float plain_div, lambda;
};

// Model m's sparsification of task-vector value d at element j (TIES cut or DARE mask and
// scale; unchanged without a mask).
__device__ __forceinline__ float gta_sparsify(const GtaModel& m, float d, u64 j, u64 name_hash) {
    if (m.mask == MASK_RANK) {
        u32 key = ~(__float_as_uint(d) & 0x7fffffffu);
        bool keep = ((((u64)key) << 32) | j) < m.cut;
        d = keep ? d : 0.0f;
    } else if (m.mask == MASK_OUTLIER) {
        // Breadcrumbs: keep the positions [threshold, cut) of the ascending order.
        u64 c = (((u64)order_key(d, ORDER_ASC)) << 32) | j;
        d = (c >= m.threshold && c < m.cut) ? d : 0.0f;
    } else if (m.mask == MASK_DELLA) {
        // `della::keep_prob` in f32, then DARE's Philox test with that probability. (Rank and
        // group length are rounded to f32 before 1 is taken off, as the CPU does: the same
        // value beyond 2^24 too.)
        u32 rank = ((const u32*)m.aux)[j];
        float rn = 1.0f;
        if (m.group > 1)
            rn = fminf(fmaxf(((float)rank - 1.0f) / ((float)m.group - 1.0f), 0.0f), 1.0f);
        float p = m.dm + (rn * 2.0f) * m.de;
        u32 w = philox_word0((u32)name_hash, (u32)(name_hash >> 32), (u32)j, (u32)(j >> 32), m.k0,
                             m.k1);
        d = ((u64)w < keep_threshold_of(p)) ? (m.inv ? d / p : d) : 0.0f;
    } else if (m.mask == MASK_DARE) {
        u32 w = philox_word0((u32)name_hash, (u32)(name_hash >> 32), (u32)j, (u32)(j >> 32), m.k0,
                             m.k1);
        d = ((u64)w < m.threshold) ? d * m.scale : 0.0f;
    }
    return d;
}

// The pipeline's steps 2-5 for one element from the sparsified task vectors v[0..n_models).
template <int MAXN>
__device__ __forceinline__ float gta_mix(const float (&w)[MAXN], const GtaArgs& a, const float* v,
                                         float b) {
    int n_models = a.n_models;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < MAXN; i++) {
        if (i < n_models) {
            if (a.consensus == CONS_COUNT) {
                float p = v[i] > 0.0f ? 1.0f : 0.0f;
                float q = v[i] < 0.0f ? 1.0f : 0.0f;
                s += p - q;
            } else {
                s += v[i];
            }
        }
    }
    float m;
    if (a.consensus == CONS_NONE) {
        m = s;
        if (a.normalize) m = m / a.plain_div;
    } else {
        bool up = a.strict ? ((s > 0.0f) || (s == 0.0f && a.zero_pos)) : (s >= 0.0f);
        float pos = up ? 1.0f : -1.0f;
        float mix = 0.0f, div = 0.0f;
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models) {
                bool take = v[i] * pos > 0.0f;
                mix += take ? v[i] : 0.0f;
                div += take ? w[i] : 0.0f;
            }
        }
        div = div == 0.0f ? 1.0f : div;
        m = mix;
        if (a.normalize) m = m / div;
    }
    if (a.lambda != 1.0f) m = m * a.lambda;
    return b + m;
}

// Sparsify, rescale and weight x (model m's value at j) against base value b.
__device__ __forceinline__ float gta_weighted(const GtaModel& m, float x, float b, u64 j,
                                              u64 name_hash) {
    return (gta_sparsify(m, x - b, j, name_hash) * m.factor) * m.weight;
}

template <int V>
__device__ __forceinline__ void loadv(const void* p, int dt, u64 g, float* v) {
    if (V == 8) {
        load8(p, dt, g, v);
    } else {
        load4(p, dt, g, v);
    }
}

template <int V>
__device__ __forceinline__ void storev(void* p, int dt, u64 g, const float* v) {
    if (V == 8) {
        store8(p, dt, g, v);
    } else {
        store4(p, dt, g, v);
    }
}

// V (4 or 8) elements per thread (vector loads), every model's loads issued before the
// arithmetic.
// Exponent bits of x: 0x7f800000 exactly when x is not finite.
__device__ __forceinline__ u32 exp_bits(float x) { return __float_as_uint(x) & 0x7f800000u; }

// The merge loop over `m` (the models, in registers or shared memory). Non-finite inputs are
// found by the largest exponent of a group; only then is each input checked.
template <int MAXN, int V>
__device__ __forceinline__ void gta_loop(const GtaModel (&m)[MAXN], const GtaArgs& a) {
    int n_models = a.n_models;
    u64* bad = (u64*)a.bad;
    float w[MAXN];
#pragma unroll
    for (int i = 0; i < MAXN; i++) w[i] = i < n_models ? m[i].weight : 0.0f;
    u64 groups = a.n / V;
    GRID_STRIDE(g, groups) {
        float b[V];
        loadv<V>((const void*)a.base, a.base_dt, g, b);
        float x[MAXN][V];
#pragma unroll
        for (int i = 0; i < MAXN; i++)
            if (i < n_models) loadv<V>((const void*)m[i].ptr, m[i].dt, g, x[i]);
        u32 ex = 0;
#pragma unroll
        for (int k = 0; k < V; k++) {
            ex = max(ex, exp_bits(b[k]));
#pragma unroll
            for (int i = 0; i < MAXN; i++)
                if (i < n_models) ex = max(ex, exp_bits(x[i][k]));
        }
        if (ex == 0x7f800000u) {
#pragma unroll
            for (int k = 0; k < V; k++) {
                note_nonfinite(bad, 0, b[k], V * g + k);
#pragma unroll
                for (int i = 0; i < MAXN; i++)
                    if (i < n_models) note_nonfinite(bad, 1 + i, x[i][k], V * g + k);
            }
        }
        float o[V];
#pragma unroll
        for (int k = 0; k < V; k++) {
            u64 j = V * g + k;
            float v[MAXN];
#pragma unroll
            for (int i = 0; i < MAXN; i++)
                if (i < n_models) v[i] = gta_weighted(m[i], x[i][k], b[k], j, a.name_hash);
            o[k] = gta_mix<MAXN>(w, a, v, b[k]);
        }
        storev<V>((void*)a.out, a.out_dt, g, o);
    }
    // Tail: fewer than V elements.
    u64 j = groups * V + (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < a.n) {
        float b = load_elem((const void*)a.base, a.base_dt, j);
        note_nonfinite(bad, 0, b, j);
        float v[MAXN];
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models) {
                float x = load_elem((const void*)m[i].ptr, m[i].dt, j);
                note_nonfinite(bad, 1 + i, x, j);
                v[i] = gta_weighted(m[i], x, b, j, a.name_hash);
            }
        }
        store_elem((void*)a.out, a.out_dt, j, gta_mix<MAXN>(w, a, v, b));
    }
}

// The models in shared memory (any mix of masks).
template <int MAXN, int V>
__device__ __forceinline__ void gta_body(const GtaModel* __restrict__ gmodels, const GtaArgs& a) {
    __shared__ GtaModel sm[MAXN];
    int n_models = a.n_models;
    for (int i = threadIdx.x; i < n_models && i < MAXN; i += blockDim.x) sm[i] = gmodels[i];
    __syncthreads();
    gta_loop<MAXN, V>(sm, a);
}

#define MODE_NONE 0
#define MODE_RANK 1
#define MODE_DARE 2

// The pipeline with every model's mask of one kind (MODE; a model without a mask gets a cut or
// threshold that keeps everything, which changes no bit) and the per-model constants in
// registers: the usual case, up to 8 models, 4 elements per thread. MODE_RANK compares flat
// indices in 32 bits: only for tensors of fewer than 2^32 elements.
// One model's weighted, sparsified task-vector value d at element j in `gta_fast` (the mask of
// MODE from its register constants, then rescale factor f and weight w).
template <int MODE>
__device__ __forceinline__ float fast_value(float d, u64 j, u32 ck, u32 cj, u64 thr, float sc,
                                            u32 k0, u32 k1, u32 h0, u32 h1, float f, float w) {
    if (MODE == MODE_RANK) {
        u32 key = ~(__float_as_uint(d) & 0x7fffffffu);
        bool keep = key < ck || (key == ck && (u32)j < cj);
        d = keep ? d : 0.0f;
    } else if (MODE == MODE_DARE) {
        u32 r = philox_word0(h0, h1, (u32)j, (u32)(j >> 32), k0, k1);
        d = ((u64)r < thr) ? d * sc : 0.0f;
    }
    return (d * f) * w;
}

// The host's part of each model for `gta_fast`, passed by value (layout shared with
// `amalgam_cuda::merge::FastTable`): in the kernel's parameter space these are operands of the
// loop's instructions, not registers, which leaves registers for every input's loads to be in
// flight together. Unused slots read the base (`ptr`, `dt`) and are otherwise zero.
struct FastModel {
    u64 ptr;    // the model's tensor
    u64 thr;    // DARE: keep when the Philox word is below this (2^32: keep all)
    u64 cut;    // TIES: keep when (key << 32 | index) < cut (all ones: keep all)
    float w;    // weight
    float f;    // L1 rescale factor (1 when none)
    float sc;   // DARE: factor of kept entries (1 without DARE)
    int dt;     // encoding
    u32 k0, k1; // Philox key
};
#define FAST_TABLE 8
struct FastTable {
    FastModel m[FAST_TABLE];
};
static_assert(sizeof(FastTable) == 384, "FastTable's layout is shared with merge.rs");

template <int MAXN, int MODE, int V, bool HALF>
__device__ __forceinline__ void gta_fast(const FastTable& t, const GtaArgs& a) {
    int n_models = a.n_models;
    // The cut's key and index halves (MODE_RANK: n < 2^32). (Read from the device's models
    // instead, into uniform registers, they made the compiler issue `gta_rank_8_h`'s loads one
    // after another's use.)
    u32 ck[MAXN], cj[MAXN];
    float w[MAXN];
#pragma unroll
    for (int i = 0; i < MAXN; i++) {
        w[i] = t.m[i].w;
        u64 cut = MODE == MODE_RANK ? t.m[i].cut : ~0ull;
        ck[i] = (u32)(cut >> 32);
        cj[i] = (u32)cut;
    }
    u64* bad = (u64*)a.bad;
    u64 groups = a.n / V;
    u32 h0 = (u32)a.name_hash, h1 = (u32)(a.name_hash >> 32);
    GRID_STRIDE(g, groups) {
        // Every slot is loaded (unused ones read the base again), so that no load waits on a
        // predicate: with them, the compiler delayed the last load past the first use.
        float b[V];
        float x[MAXN][V];
        if constexpr (HALF) {
            // f16/bf16 inputs only: every input fetched, then decoded (`fetch`).
            Raw<V> rb, r[MAXN];
            fetch<V, true>((const void*)a.base, a.base_dt, g, rb);
#pragma unroll
            for (int i = 0; i < MAXN; i++)
                fetch<V, true>((const void*)t.m[i].ptr, t.m[i].dt, g, r[i]);
            decode<V, true>(rb, a.base_dt, b);
#pragma unroll
            for (int i = 0; i < MAXN; i++) decode<V, true>(r[i], t.m[i].dt, x[i]);
        } else {
            // f32 inputs (or a mix): f32 loads need no decoding, so they are all in flight
            // together as they are; fetching first would cost registers (5 to 4 blocks per
            // multiprocessor for gta_plain_4).
            loadv<V>((const void*)a.base, a.base_dt, g, b);
#pragma unroll
            for (int i = 0; i < MAXN; i++) loadv<V>((const void*)t.m[i].ptr, t.m[i].dt, g, x[i]);
        }
        u32 ex = 0;
#pragma unroll
        for (int k = 0; k < V; k++) {
            ex = max(ex, exp_bits(b[k]));
#pragma unroll
            for (int i = 0; i < MAXN; i++)
                ex = max(ex, exp_bits(x[i][k]));
        }
        if (ex == 0x7f800000u) {
#pragma unroll
            for (int k = 0; k < V; k++) {
                note_nonfinite(bad, 0, b[k], V * g + k);
#pragma unroll
                for (int i = 0; i < MAXN; i++)
                    if (i < n_models) note_nonfinite(bad, 1 + i, x[i][k], V * g + k);
            }
        }
        float o[V];
#pragma unroll
        for (int k = 0; k < V; k++) {
            u64 j = V * g + k;
            float v[MAXN];
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
                if (i < n_models) {
                    v[i] = fast_value<MODE>(x[i][k] - b[k], j, ck[i], cj[i], t.m[i].thr,
                                            t.m[i].sc, t.m[i].k0, t.m[i].k1, h0, h1, t.m[i].f,
                                            w[i]);
                }
            }
            o[k] = gta_mix<MAXN>(w, a, v, b[k]);
        }
        storev<V>((void*)a.out, a.out_dt, g, o);
    }
    // Tail: fewer than V elements.
    u64 j = groups * V + (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (j < a.n) {
        float b = load_elem((const void*)a.base, a.base_dt, j);
        note_nonfinite(bad, 0, b, j);
        float v[MAXN];
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models) {
                float x = load_elem((const void*)t.m[i].ptr, t.m[i].dt, j);
                note_nonfinite(bad, 1 + i, x, j);
                v[i] = fast_value<MODE>(x - b, j, ck[i], cj[i], t.m[i].thr, t.m[i].sc, t.m[i].k0,
                                        t.m[i].k1, h0, h1, t.m[i].f, w[i]);
            }
        }
        store_elem((void*)a.out, a.out_dt, j, gta_mix<MAXN>(w, a, v, b));
    }
}

// Instances by the largest model count they take (N), V elements per thread; HALF: f16/bf16
// inputs only (`_v8`: 8 elements per thread, 16-byte loads, up to 4 models; `_h`: 4 elements
// per thread, up to 8 models, where 8 per thread would hold too many decoded values).
#define FAST_INSTANCE(N, V, HALF, SUFFIX)                                                    \
    extern "C" __global__ void gta_plain_##N##SUFFIX(FastTable t, GtaArgs a) {                \
        gta_fast<N, MODE_NONE, V, HALF>(t, a);                                               \
    }                                                                                        \
    extern "C" __global__ void gta_rank_##N##SUFFIX(FastTable t, GtaArgs a) {                 \
        gta_fast<N, MODE_RANK, V, HALF>(t, a);                                               \
    }                                                                                        \
    extern "C" __global__ void gta_dare_##N##SUFFIX(FastTable t, GtaArgs a) {                 \
        gta_fast<N, MODE_DARE, V, HALF>(t, a);                                               \
    }
FAST_INSTANCE(2, 4, false, )
FAST_INSTANCE(4, 4, false, )
FAST_INSTANCE(8, 4, false, )
FAST_INSTANCE(2, 8, true, _v8)
FAST_INSTANCE(4, 8, true, _v8)
FAST_INSTANCE(8, 4, true, _h)

// Instances by the largest model count they accept (the caller picks the smallest that fits).
// (4 elements per thread, as merge.rs launches them.)
extern "C" __global__ void gta_merge_2(const GtaModel* m, GtaArgs a) { gta_body<2, 4>(m, a); }
extern "C" __global__ void gta_merge_4(const GtaModel* m, GtaArgs a) { gta_body<4, 4>(m, a); }
extern "C" __global__ void gta_merge_8(const GtaModel* m, GtaArgs a) { gta_body<8, 4>(m, a); }
extern "C" __global__ void gta_merge_16(const GtaModel* m, GtaArgs a) { gta_body<16, 4>(m, a); }

// L1 norms of each model's task vector before and after sparsification, for the per-tensor
// rescale: block c sums elements [c*L1_CHUNK, (c+1)*L1_CHUNK) in f64 with a fixed tree order,
// writing partials[(c * n_models + i) * 2 + {0: before, 1: after}]. The host adds the partials
// in chunk order, so the result does not depend on the device.
#define L1_CHUNK 65536
extern "C" __global__ void gta_l1(const GtaModel* models, GtaArgs a, double* partials) {
    __shared__ double red[2][256];
    u64 lo = (u64)blockIdx.x * L1_CHUNK;
    u64 hi = lo + L1_CHUNK < a.n ? lo + L1_CHUNK : a.n;
    for (int i = 0; i < a.n_models; i++) {
        const GtaModel m = models[i];
        double before = 0.0, after = 0.0;
        for (u64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
            float b = load_elem((const void*)a.base, a.base_dt, j);
            float d = load_elem((const void*)m.ptr, m.dt, j) - b;
            before += (double)fabsf(d);
            after += (double)fabsf(gta_sparsify(m, d, j, a.name_hash));
        }
        red[0][threadIdx.x] = before;
        red[1][threadIdx.x] = after;
        __syncthreads();
        for (int s = blockDim.x / 2; s > 0; s >>= 1) {
            if (threadIdx.x < s) {
                red[0][threadIdx.x] += red[0][threadIdx.x + s];
                red[1][threadIdx.x] += red[1][threadIdx.x + s];
            }
            __syncthreads();
        }
        if (threadIdx.x == 0) {
            partials[((u64)blockIdx.x * a.n_models + i) * 2] = red[0][0];
            partials[((u64)blockIdx.x * a.n_models + i) * 2 + 1] = red[1][0];
        }
        __syncthreads();
    }
}

// Dtype conversion: out[j] = in[j] re-encoded.
extern "C" __global__ void convert(const void* in, int in_dt, void* out, int out_dt, u64 n) {
    GRID_STRIDE(j, n) { store_elem(out, out_dt, j, load_elem(in, in_dt, j)); }
}

// DELLA ranks of model `model`, 1-based within each rank group, ascending by the key
// (|d| bits << 32) | position (the position of the element within its group; keys are unique).
// Group g (of n / c) of c elements: slab o = g / inner, index t = g % inner; its element at
// position p is at flat index o * c * inner + p * inner + t (inner = 1: rows, g * c + p).
// One kernel entry point, three modes (DELLA_*):
//  - DELLA_RANK (c <= seg): each group sorted whole by a bitonic sort of `pow2` keys in dynamic
//    shared memory, ranks[j] = 1 + its position in the order. A block sorts 2 * blockDim.x /
//    pow2 groups at once when groups are shorter than that (every thread compares a pair).
//  - DELLA_SEGMENTS (c > seg, seg = pow2): each group cut into segments of seg positions (the
//    last one shorter when seg does not divide c), each sorted alone the same way, the key at
//    sorted position i of segment s written to keys[g * c + s * seg + i].
//  - DELLA_COUNT (after DELLA_SEGMENTS, no shared memory): the key at sorted position i of
//    segment s gets rank 1 + i + the number of keys below it in each other segment of its group
//    (a binary search in each sorted segment).
#define DELLA_RANK 0
#define DELLA_SEGMENTS 1
#define DELLA_COUNT 2

// Flat index of position p of group g (`della_ranks`).
__device__ __forceinline__ u64 della_elem(u64 g, u64 p, u32 c, u64 inner) {
    return inner == 1 ? g * c + p : (g / inner) * c * inner + p * inner + g % inner;
}

// The number of keys of the sorted s[0..len) below k.
__device__ __forceinline__ u32 della_below(const u64* __restrict__ s, u32 len, u64 k) {
    u32 lo = 0, hi = len;
    while (lo < hi) {
        u32 mid = lo + (hi - lo) / 2;
        if (s[mid] < k) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// DELLA_COUNT: ranks from the sorted segments of `keys` (n keys, groups of c, segments of seg).
__device__ __forceinline__ void della_count(u64 n, u32 c, u64 inner, u32 seg, u32* ranks,
                                            const u64* __restrict__ keys) {
    u32 nseg = (u32)(((u64)c + seg - 1) / seg);
    GRID_STRIDE(t, n) {
        u64 g = t / c;
        u32 w = (u32)(t - g * c);  // slot within the group
        u32 s = w / seg;
        u64 k = keys[t];
        const u64* grp = keys + g * c;
        u32 rank = 1 + (w - s * seg);
        for (u32 o = 0; o < nseg; o++) {
            if (o == s) continue;
            u64 lo = (u64)o * seg;
            u64 rest = (u64)c - lo;
            rank += della_below(grp + lo, rest < seg ? (u32)rest : seg, k);
        }
        ranks[della_elem(g, k & 0xffffffffull, c, inner)] = rank;
    }
}

extern "C" __global__ void __launch_bounds__(1024)
    della_ranks(const GtaModel* models, GtaArgs a, int model, u32 c, u64 inner, u32 seg, u32 pow2,
                int mode, u32* ranks, u64* keys) {
    if (mode == DELLA_COUNT) {
        della_count(a.n, c, inner, seg, ranks, keys);
        return;
    }
    DYNAMIC_SHARED(u64, sk);
    const GtaModel m = models[model];
    u64 groups = a.n / c;
    u32 nseg = (u32)(((u64)c + seg - 1) / seg);  // 1 in DELLA_RANK (seg = c)
    u64 units = groups * nseg;                    // (group, segment) pairs, each sorted alone
    u32 span = 2 * blockDim.x;                         // keys a step sorts at least
    u32 per = pow2 < span ? span / pow2 : 1;           // units per step
    u32 total = per * pow2;                            // keys in shared memory
    u32 lp = __ffs(pow2) - 1, lq = __ffs(per) - 1;     // both powers of two
    // Thread e takes key r of unit q: r = e % pow2 for rows (consecutive threads read
    // consecutive elements of a row); across the units (q = e % per) for strided groups, whose
    // consecutive groups are adjacent in memory.
    bool rows = inner == 1;
    for (u64 u0 = (u64)blockIdx.x * per; u0 < units; u0 += (u64)gridDim.x * per) {
        for (u32 e = threadIdx.x; e < total; e += blockDim.x) {
            u32 q = rows ? e >> lp : e & (per - 1);
            u32 r = rows ? e & (pow2 - 1) : e >> lq;
            u64 u = u0 + q;
            u64 g = nseg == 1 ? u : u / nseg;
            u64 p = (u64)(nseg == 1 ? 0u : (u32)(u - g * nseg)) * seg + r;  // position in group
            u64 v = ~0ull;
            if (u < units && r < seg && p < c) {
                u64 j = della_elem(g, p, c, inner);
                float d = load_elem((const void*)m.ptr, m.dt, j) -
                          load_elem((const void*)a.base, a.base_dt, j);
                v = (((u64)(__float_as_uint(d) & 0x7fffffffu)) << 32) | p;
            }
            sk[q * pow2 + r] = v;
        }
        __syncthreads();
        // Bitonic stages: thread t compares pair t of total / 2, keys i and i + h (i has bit h
        // clear), ascending where bit k of i's position in its unit is clear (k = pow2: all).
        for (u32 k = 2; k <= pow2; k <<= 1) {
            u32 dir = k & (pow2 - 1);
            for (u32 h = k >> 1; h > 0; h >>= 1) {
                for (u32 t = threadIdx.x; t < total / 2; t += blockDim.x) {
                    u32 i = ((t & ~(h - 1)) << 1) | (t & (h - 1));
                    u64 x = sk[i], y = sk[i + h];
                    bool swap = (x > y) == ((i & dir) == 0);  // out of this pair's order
                    sk[i] = swap ? y : x;
                    sk[i + h] = swap ? x : y;
                }
                __syncthreads();
            }
        }
        // Padding keys (all ones) sort last: sorted position r < the unit's length is a key.
        for (u32 e = threadIdx.x; e < total; e += blockDim.x) {
            u32 q = rows ? e >> lp : e & (per - 1);
            u32 r = rows ? e & (pow2 - 1) : e >> lq;
            u64 u = u0 + q;
            u64 g = nseg == 1 ? u : u / nseg;
            u64 slot = (u64)(nseg == 1 ? 0u : (u32)(u - g * nseg)) * seg + r;
            if (u < units && r < seg && slot < c) {
                u64 key = sk[q * pow2 + r];
                if (mode == DELLA_RANK) {
                    ranks[della_elem(g, key & 0xffffffffull, c, inner)] = r + 1;
                } else {
                    keys[g * c + slot] = key;
                }
            }
        }
        __syncthreads();
    }
}
