// Exact magnitude selection for TIES (per tensor, per model), without sorting and without a
// host round trip:
//
// 1. `sample_hist`: a 16-bit histogram of the keys of a sample (chunks of SAMPLE_CHUNK elements,
//    one every `stride` chunks) per model;
// 2. `bracket_pick`: per model, the key range [lo, hi] that holds the sample ranks around the
//    target quantile with a wide margin;
// 3. `bracket_compact`: one pass over all elements counting keys below `lo` and gathering the
//    composite keys (key << 32 | index) inside [lo, hi];
// 4. `bracket_check`: whether the target position falls inside the gathered range (else the
//    host reruns the model with the whole tensor gathered), and the rank inside it;
// 5. four `cand_hist` + `cand_pick` rounds (16 bits each) find the exact composite key at that
//    rank, which becomes the model's cut (`GtaModel.cut`): exactly `p` elements precede it in
//    the (key, index) order, ties between equal magnitudes going to the lowest index as on the
//    CPU.
//
// The key of a task-vector value d is ~(bits(|d|)): ascending keys are descending magnitudes.

#define SAMPLE_CHUNK 256
#define HBINS 65536

struct SelModel {
    u64 p;          // target position (elements kept)
    u64 before;     // keys below lo (from bracket_compact)
    u64 count;      // gathered candidates
    u64 target;     // rank still to find inside the current prefix
    u64 prefix;     // composite bits found so far
    u64 prefix_mask;
    u64 cand_off;   // this model's candidates start at cand[cand_off]
    u32 lo, hi;     // bracket keys
    int active;     // 1: select for this model
    int ok;         // bracket_check result
};

__device__ __forceinline__ u32 mag_key(float d) { return ~(__float_as_uint(d) & 0x7fffffffu); }

// Grid: x over sample chunks, y over models. hist: [n_models][HBINS].
extern "C" __global__ void sample_hist(const GtaModel* models, const SelModel* sel, GtaArgs a,
                                       u64 stride, u64 n_chunks, u32* hist) {
    int i = blockIdx.y;
    if (!sel[i].active) return;
    const GtaModel m = models[i];
    u32* h = hist + (u64)i * HBINS;
    for (u64 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        u64 j = c * stride * SAMPLE_CHUNK + threadIdx.x;
        if (j < a.n) {
            float b = load_elem((const void*)a.base, a.base_dt, j);
            float d = load_elem((const void*)m.ptr, m.dt, j) - b;
            atomicAdd(h + (mag_key(d) >> 16), 1u);
        }
    }
}

// Block-wide search in a histogram of HBINS bins for position `r`: returns the bin holding it
// and sets *below to the number of entries in lower bins. blockDim.x == 1024.
__device__ u32 find_bin(const u32* h, u64 r, u64* below) {
    __shared__ u64 sums[1024];
    __shared__ u32 found_bin;
    __shared__ u64 found_below;
    const int per = HBINS / 1024;
    int t = threadIdx.x;
    u64 mine = 0;
    for (int k = 0; k < per; k++) mine += h[t * per + k];
    sums[t] = mine;
    __syncthreads();
    // Inclusive scan (Hillis-Steele).
    for (int off = 1; off < 1024; off <<= 1) {
        u64 v = t >= off ? sums[t - off] : 0;
        __syncthreads();
        sums[t] += v;
        __syncthreads();
    }
    if (t == 0) {
        found_bin = HBINS - 1;
        found_below = sums[1023] - h[HBINS - 1];
    }
    __syncthreads();
    u64 excl = sums[t] - mine;
    if (r >= excl && r < sums[t]) {
        u64 acc = excl;
        for (int k = 0; k < per; k++) {
            u32 c = h[t * per + k];
            if (r < acc + c) {
                found_bin = t * per + k;
                found_below = acc;
                break;
            }
            acc += c;
        }
    }
    __syncthreads();
    *below = found_below;
    return found_bin;
}

// One block (1024 threads) per model: the bracket from the sample histogram.
extern "C" __global__ void bracket_pick(SelModel* sel, const u32* hist, u64 n, u64 sampled) {
    int i = blockIdx.x;
    if (!sel[i].active) return;
    const u32* h = hist + (u64)i * HBINS;
    double q = (double)sel[i].p / (double)n;
    double mid = q * (double)sampled;
    double margin = 6.0 * sqrt((double)sampled * q * (1.0 - q)) + 64.0;
    double rlo = floor(mid - margin), rhi = ceil(mid + margin);
    u64 below;
    u32 lo = 0, hi = 0xffffffffu;
    if (rlo > 0.0) lo = find_bin(h, (u64)rlo, &below) << 16;
    __syncthreads();
    if (rhi < (double)sampled - 1.0) hi = (find_bin(h, (u64)rhi, &below) << 16) | 0xffffu;
    if (threadIdx.x == 0) {
        sel[i].lo = lo;
        sel[i].hi = hi;
        sel[i].before = 0;
        sel[i].count = 0;
    }
}

// Count keys below lo and gather composite keys inside [lo, hi] (at most cap per model).
extern "C" __global__ void bracket_compact(const GtaModel* models, SelModel* sel, GtaArgs a,
                                           u64* cand, u64 cap) {
    __shared__ unsigned long long below[64];
    int n_models = a.n_models;
    if (threadIdx.x < 64) below[threadIdx.x] = 0;
    __syncthreads();
    int lane = threadIdx.x & 31;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 start = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    u64 rounds = (a.n + stride - 1) / stride;
    for (u64 r = 0; r < rounds; r++) {
        u64 j = start + r * stride;
        bool in = j < a.n;
        float b = in ? load_elem((const void*)a.base, a.base_dt, j) : 0.0f;
        for (int i = 0; i < n_models; i++) {
            if (!sel[i].active) continue;
            u32 lo = sel[i].lo, hi = sel[i].hi;
            u32 key = 0xffffffffu;
            if (in) key = mag_key(load_elem((const void*)models[i].ptr, models[i].dt, j) - b);
            unsigned lt = __ballot_sync(0xffffffffu, in && key < lo);
            unsigned take = __ballot_sync(0xffffffffu, in && key >= lo && key <= hi);
            if (lane == 0 && lt) atomicAdd(&below[i], (unsigned long long)__popc(lt));
            if (take) {
                u64 basepos = 0;
                if (lane == 0) basepos = atomicAdd((unsigned long long*)&sel[i].count,
                                                   (unsigned long long)__popc(take));
                basepos = __shfl_sync(0xffffffffu, basepos, 0);
                if (take & (1u << lane)) {
                    u64 pos = basepos + __popc(take & ((1u << lane) - 1));
                    if (pos < cap) cand[sel[i].cand_off + pos] = (((u64)key) << 32) | j;
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x < n_models && below[threadIdx.x])
        atomicAdd((unsigned long long*)&sel[threadIdx.x].before, below[threadIdx.x]);
}

// One thread per model: does the target fall inside the gathered range?
extern "C" __global__ void bracket_check(SelModel* sel, int n_models, u64 cap) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_models || !sel[i].active) return;
    SelModel s = sel[i];
    bool ok = s.count <= cap && s.before <= s.p && s.p < s.before + s.count;
    sel[i].ok = ok ? 1 : 0;
    sel[i].target = ok ? s.p - s.before : 0;
    sel[i].prefix = 0;
    sel[i].prefix_mask = 0;
}

// Histogram of 16 bits (at `shift`) of the candidates matching the prefix found so far.
// Grid: x over candidates, y over models. hist: [n_models][HBINS].
extern "C" __global__ void cand_hist(const SelModel* sel, const u64* cand, u64 cap, int shift,
                                     u32* hist) {
    int i = blockIdx.y;
    SelModel s = sel[i];
    if (!s.active || !s.ok) return;
    u64 m = s.count;
    const u64* c = cand + s.cand_off;
    u32* h = hist + (u64)i * HBINS;
    GRID_STRIDE(k, m) {
        u64 v = c[k];
        if ((v & s.prefix_mask) == s.prefix) atomicAdd(h + ((v >> shift) & 0xffffu), 1u);
    }
}

// One block (1024 threads) per model: extend the prefix by the bin holding the target rank.
// After the round with shift 0 the prefix is the exact composite key: written as the cut.
extern "C" __global__ void cand_pick(SelModel* sel, GtaModel* models, const u32* hist, int shift) {
    int i = blockIdx.x;
    if (!sel[i].active || !sel[i].ok) return;
    u64 below;
    u32 bin = find_bin(hist + (u64)i * HBINS, sel[i].target, &below);
    if (threadIdx.x == 0) {
        sel[i].target -= below;
        sel[i].prefix |= ((u64)bin) << shift;
        sel[i].prefix_mask |= 0xffffull << shift;
        if (shift == 0) models[i].cut = sel[i].prefix;
    }
}
