// Elementwise merge kernels: linear / task arithmetic over all inputs in one pass, and the
// generalized task arithmetic pipeline (TIES, DARE, task arithmetic) fused per element.
// Per element they perform the f32 operations of the CPU path in the same order (compiled with
// --fmad=false), so results are bit-identical to it.

// out = sum_i x_i * w_i (model order), divided by `div` when has_div.
extern "C" __global__ void linear_merge(const u64* ptrs, const int* dts, const float* w, int n_in,
                                        int has_div, float div, u64 n, void* out, int out_dt,
                                        u64* bad) {
    u64 groups = n / 8;
    GRID_STRIDE(g, groups) {
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; k++) acc[k] = 0.0f;
        for (int i = 0; i < n_in; i++) {
            float v[8];
            load8((const void*)ptrs[i], dts[i], g, v);
            float wi = w[i];
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
    // Tail: fewer than 8 elements.
    u64 t = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 j = groups * 8 + t;
    if (j < n) {
        float acc = 0.0f;
        for (int i = 0; i < n_in; i++) {
            float v = load_elem((const void*)ptrs[i], dts[i], j);
            note_nonfinite(bad, i, v, j);
            acc += v * w[i];
        }
        if (has_div) acc /= div;
        store_elem(out, out_dt, j, acc);
    }
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
    int pad;
};

#define MASK_NONE 0
#define MASK_RANK 1
#define MASK_DARE 2

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
    int strict, zero_pos, normalize, pad;
    float plain_div, lambda;
};

// The sparsified task vector of model `m` at element j (sparsify, DARE scale, rescale).
__device__ __forceinline__ float gta_delta(const GtaModel& m, float b, u64 j, u64 name_hash,
                                           u64* bad, int slot) {
    float x = load_elem((const void*)m.ptr, m.dt, j);
    note_nonfinite(bad, slot, x, j);
    float d = x - b;
    if (m.mask == MASK_RANK) {
        u32 key = ~(__float_as_uint(d) & 0x7fffffffu);
        bool keep = ((((u64)key) << 32) | j) < m.cut;
        d = keep ? d : 0.0f;
    } else if (m.mask == MASK_DARE) {
        u32 w = philox_word0((u32)name_hash, (u32)(name_hash >> 32), (u32)j, (u32)(j >> 32), m.k0,
                             m.k1);
        d = ((u64)w < m.threshold) ? d * m.scale : 0.0f;
    }
    return d * m.factor;
}

template <int MAXN>
__device__ __forceinline__ void gta_body(const GtaModel* __restrict__ models, const GtaArgs& a) {
    int n_models = a.n_models;
    u64* bad = (u64*)a.bad;
    GRID_STRIDE(j, a.n) {
        float b = load_elem((const void*)a.base, a.base_dt, j);
        note_nonfinite(bad, 0, b, j);
        float v[MAXN];
        float s = 0.0f;
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models) {
                v[i] = gta_delta(models[i], b, j, a.name_hash, bad, 1 + i) * models[i].weight;
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
                    div += take ? models[i].weight : 0.0f;
                }
            }
            div = div == 0.0f ? 1.0f : div;
            m = mix;
            if (a.normalize) m = m / div;
        }
        if (a.lambda != 1.0f) m = m * a.lambda;
        store_elem((void*)a.out, a.out_dt, j, b + m);
    }
}

// Instances by the largest model count they accept (the caller picks the smallest that fits).
extern "C" __global__ void gta_merge_2(const GtaModel* m, GtaArgs a) { gta_body<2>(m, a); }
extern "C" __global__ void gta_merge_4(const GtaModel* m, GtaArgs a) { gta_body<4>(m, a); }
extern "C" __global__ void gta_merge_8(const GtaModel* m, GtaArgs a) { gta_body<8>(m, a); }
extern "C" __global__ void gta_merge_16(const GtaModel* m, GtaArgs a) { gta_body<16>(m, a); }
extern "C" __global__ void gta_merge_64(const GtaModel* m, GtaArgs a) { gta_body<64>(m, a); }

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
        GtaModel m = models[i];
        m.factor = 1.0f;
        double before = 0.0, after = 0.0;
        for (u64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
            float b = load_elem((const void*)a.base, a.base_dt, j);
            float x = load_elem((const void*)m.ptr, m.dt, j);
            float d = x - b;
            before += (double)fabsf(d);
            after += (double)fabsf(gta_delta(m, b, j, a.name_hash, (u64*)a.bad, 1 + i));
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

// Device copy for the bandwidth reference (16-byte words).
extern "C" __global__ void copy16(const uint4* in, uint4* out, u64 n16) {
    GRID_STRIDE(j, n16) { out[j] = in[j]; }
}
