// Exact magnitude selection for TIES (per tensor, per model): the cut that keeps exactly `p`
// elements in the order (key, index), key = ~bits(|d|) (ascending keys are descending
// magnitudes, ties to the lowest index), as the CPU's `select` does; breadcrumbs select in the
// ascending order of |d| (`GtaModel.order`, `order_key`). No sort, no gather:
//
// 1. `sample_hist` / `sample_pick`: the high 16 key bits of a sample (chunks of SAMPLE_CHUNK
//    elements, one every `stride` chunks) locate a bracket [lo, hi] of at most FINE_SPAN high
//    bins around the target quantile, with a wide margin; `sample_hist_lo` / `sample_pick_lo`
//    refine the sample's own key at the target (`guess`).
// 2. `bracket_pass`: one pass over every element counting keys below `lo`, histogramming the
//    keys inside [lo, hi] at full resolution, counting per TIE_CHUNK chunk the keys equal to
//    `guess`, and listing (key, index) of the elements inside the bracket whose key is within
//    CAND_SPAN of the guess (the candidates, `cand`).
// 3. `resolve`: the exact key K at position p and the number of keys below it; when some but
//    not all elements with key K come before p, the index of the (p - less)-th of them: from
//    the per-chunk counts and one chunk's scan when K is the guess, from the candidates when
//    they hold every element of K (K near the guess, the list not overflowed, at most 1024
//    elements). Otherwise `tie_pass` counts K per chunk and `resolve` runs again. If p is
//    outside the bracket (the sample misled), the host takes the whole key range through
//    `full_hist` / `full_pick` and runs 2-3 again.
//
// The result, written to `GtaModel.cut`, is the composite (K << 32 | I): an element is kept
// when (key << 32 | index) < cut.

#define SAMPLE_CHUNK 256
#define HBINS 65536
#define FINE_SPAN 4
#define FINE_BINS (FINE_SPAN * HBINS)
#define TIE_CHUNK 4096
// Candidates: keys within CAND_SPAN of the guess (the sample's error is a few thousand keys).
#define CAND_SPAN 16384u

#define ST_PENDING 0
#define ST_DONE 1
#define ST_TIES 2
#define ST_MISSED 3

struct SelModel {
    u64 p;       // target position (elements kept)
    u64 before;  // keys below lo
    u64 srank;   // sample rank of the guess inside its high bin
    u64 less;    // keys below K
    u64 cut;     // result
    u32 lo, hi;  // bracket
    u32 guess;   // key counted per chunk in bracket_pass / tie_pass
    u32 key;     // K
    int active;  // select for this model
    int state;   // ST_*
};

__device__ __forceinline__ u32 mag_key(float d) { return order_key(d, ORDER_DESC); }

// SCE's key (ORDER_VAR): ~bits(f32(population variance in f64 of d[0..n))), as
// `amalgam_core::methods::sce` computes it (largest variance first).
__device__ __forceinline__ u32 var_key_of(const float* d, int n) {
    double mean = 0.0;
    for (int i = 0; i < n; i++) mean += (double)d[i];
    mean /= (double)n;
    double var = 0.0;
    for (int i = 0; i < n; i++) {
        double x = (double)d[i] - mean;
        var += x * x;
    }
    var /= (double)n;
    return ~__float_as_uint((float)var);
}

// The selection key of slot i at element j (base value b): its model's task-vector value in
// the slot's order, or (ORDER_VAR) the variance across every model.
__device__ __forceinline__ u32 model_key(const GtaModel* models, int i, const GtaArgs& a, float b,
                                         u64 j) {
    if (models[i].order == ORDER_VAR) {
        float d[16];
        int n = a.n_models < 16 ? a.n_models : 16;
        for (int k = 0; k < n; k++)
            d[k] = load_elem((const void*)models[k].ptr, models[k].dt, j) - b;
        return var_key_of(d, n);
    }
    return order_key(load_elem((const void*)models[i].ptr, models[i].dt, j) - b, models[i].order);
}

// `agg_add` with the warp's ballot of `valid` already taken (act).
__device__ __forceinline__ void agg_add_act(u32* h, u32 bin, bool valid, unsigned act) {
    if (!valid) return;
    if (__popc(act) == 1) {
        atomicAdd(h + bin, 1u);
        return;
    }
    unsigned peers = __match_any_sync(act, bin);
    if ((int)(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(h + bin, (u32)__popc(peers));
}

// Add 1 to h[bin] for every lane with `valid`, one atomic per distinct bin in the warp. Every
// lane of the warp must call it.
__device__ __forceinline__ void agg_add(u32* h, u32 bin, bool valid) {
    unsigned act = __ballot_sync(0xffffffffu, valid);
    if (act != 0) agg_add_act(h, bin, valid, act);
}

// Append `entry` to list[0..cap) for every lane with `c`, one atomic on *count per warp; *count
// goes on past cap (the entries beyond it are dropped), so a reader sees the overflow. Every
// lane of the warp must call it.
__device__ __forceinline__ void agg_append(u64* list, u32* count, u32 cap, u64 entry, bool c) {
    unsigned m = __ballot_sync(0xffffffffu, c);
    if (m == 0) return;
    int lane = threadIdx.x & 31;
    int leader = __ffs(m) - 1;
    u32 base = 0;
    if (lane == leader) base = atomicAdd(count, (u32)__popc(m));
    base = __shfl_sync(0xffffffffu, base, leader);
    if (c) {
        u32 at = base + (u32)__popc(m & ((1u << lane) - 1u));
        if (at < cap) list[at] = entry;
    }
}

// Block-wide (1024 threads) search in counts h[0..nbins) for position r: the bin holding it
// (nbins when r is past the total) and, in *below, the total of the bins before it. Each warp
// sums a contiguous slice with coalesced loads; the warp whose slice holds r scans it 32 bins
// at a time. Every thread of the block must call it.
__device__ u64 find_rank(const u32* h, u64 nbins, u64 r, u64* below) {
    __shared__ u64 wsum[32];
    __shared__ u64 f_bin, f_below, f_acc;
    __shared__ int f_warp;
    int t = threadIdx.x, w = t >> 5, lane = t & 31;
    u64 per = (nbins + 31) / 32;
    u64 b0 = (u64)w * per;
    u64 b1 = b0 + per < nbins ? b0 + per : nbins;
    u64 s = 0;
    for (u64 k = b0 + lane; k < b1; k += 32) s += h[k];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) wsum[w] = s;
    __syncthreads();
    if (t == 0) {
        u64 acc = 0;
        f_warp = -1;
        for (int i = 0; i < 32; i++) {
            if (f_warp < 0 && r < acc + wsum[i]) {
                f_warp = i;
                f_acc = acc;
            }
            acc += wsum[i];
        }
        f_bin = nbins;
        f_below = acc;
    }
    __syncthreads();
    if (w == f_warp) {
        u64 acc = f_acc;
        for (u64 k = b0; k < b1; k += 32) {
            u64 c = k + lane < b1 ? h[k + lane] : 0;
            u64 incl = c;
            for (int off = 1; off < 32; off <<= 1) {
                u64 v = __shfl_up_sync(0xffffffffu, incl, off);
                if (lane >= off) incl += v;
            }
            u64 tot = __shfl_sync(0xffffffffu, incl, 31);
            if (r < acc + tot) {
                unsigned hit = __ballot_sync(0xffffffffu, r < acc + incl);
                int first = __ffs(hit) - 1;
                if (lane == first) {
                    f_bin = k + lane;
                    f_below = acc + incl - c;
                }
                break;
            }
            acc += tot;
        }
    }
    __syncthreads();
    *below = f_below;
    u64 res = f_bin;
    __syncthreads();
    return res;
}

// Grid: x over sample chunks, y over models. hist: [n_models][HBINS]. `lo_pass`: histogram the
// low 16 bits of the keys whose high 16 bits equal guess >> 16 (else the high 16 bits).
extern "C" __global__ void sample_hist(const GtaModel* models, const SelModel* sel, GtaArgs a,
                                       u64 stride, u64 n_chunks, int lo_pass, u32* hist) {
    int i = blockIdx.y;
    if (!sel[i].active) return;
    u32 want = sel[i].guess >> 16;
    u32* h = hist + (u64)i * HBINS;
    for (u64 c = blockIdx.x; c < n_chunks; c += gridDim.x) {
        u64 j = c * stride * SAMPLE_CHUNK + threadIdx.x;
        bool in = j < a.n;
        u32 key = 0;
        if (in) key = model_key(models, i, a, load_elem((const void*)a.base, a.base_dt, j), j);
        if (lo_pass) {
            agg_add(h, key & 0xffffu, in && (key >> 16) == want);
        } else {
            agg_add(h, key >> 16, in);
        }
    }
}

// The high-bits pass of `sample_hist` with a per-block histogram in (dynamic, 128 KiB) shared
// memory: keys always have their top bit set, so 32768 bins cover them. Grid: x over blocks of
// 4 chunks (blockDim.x == 1024), y over models; each block adds its counts to hist at the end.
extern "C" __global__ void sample_hist_smem(const GtaModel* models, const SelModel* sel,
                                            GtaArgs a, u64 stride, u64 n_chunks, u32* hist) {
    DYNAMIC_SHARED(u32, sh);
    int i = blockIdx.y;
    if (!sel[i].active) return;
    for (int k = threadIdx.x; k < 32768; k += blockDim.x) sh[k] = 0;
    __syncthreads();
    int sub = threadIdx.x >> 8;
    for (u64 c = (u64)blockIdx.x * 4 + sub; c < n_chunks; c += (u64)gridDim.x * 4) {
        u64 j = c * stride * SAMPLE_CHUNK + (threadIdx.x & 255);
        if (j < a.n) {
            u32 key = model_key(models, i, a, load_elem((const void*)a.base, a.base_dt, j), j);
            atomicAdd(sh + ((key >> 16) & 0x7fffu), 1u);
        }
    }
    __syncthreads();
    u32* h = hist + (u64)i * HBINS;
    for (int k = threadIdx.x; k < 32768; k += blockDim.x)
        if (sh[k]) atomicAdd(h + (0x8000u | (u32)k), sh[k]);
}

// One block (1024 threads) per model: the bracket and the guess's high bits from the sample.
extern "C" __global__ void sample_pick(SelModel* sel, const u32* hist, u64 n, u64 sampled) {
    int i = blockIdx.x;
    if (!sel[i].active) return;
    const u32* h = hist + (u64)i * HBINS;
    double q = (double)sel[i].p / (double)n;
    double mid = floor(q * (double)sampled);
    double margin = 6.0 * sqrt((double)sampled * q * (1.0 - q)) + 64.0;
    double rlo = mid - margin, rhi = mid + margin;
    u64 below, bmid_below;
    u64 bmid = find_rank(h, HBINS, (u64)mid, &bmid_below);
    u64 blo = rlo > 0.0 ? find_rank(h, HBINS, (u64)rlo, &below) : 0;
    u64 bhi = rhi < (double)sampled - 1.0 ? find_rank(h, HBINS, (u64)rhi, &below) : HBINS - 1;
    if (threadIdx.x == 0) {
        if (bmid >= HBINS) bmid = HBINS - 1;
        // At most FINE_SPAN bins, around the middle.
        if (blo + FINE_SPAN / 2 < bmid) blo = bmid - FINE_SPAN / 2;
        if (bhi > blo + FINE_SPAN - 1) bhi = blo + FINE_SPAN - 1;
        if (bhi >= HBINS) bhi = HBINS - 1;
        sel[i].lo = (u32)(blo << 16);
        sel[i].hi = (u32)((bhi << 16) | 0xffffu);
        sel[i].guess = (u32)(bmid << 16);
        sel[i].srank = (u64)mid - bmid_below;
        sel[i].before = 0;
        sel[i].state = ST_PENDING;
    }
}

// One block (1024 threads) per model: the guess's low bits from the low-bits sample histogram.
extern "C" __global__ void sample_pick_lo(SelModel* sel, const u32* hist) {
    int i = blockIdx.x;
    if (!sel[i].active) return;
    u64 below;
    u64 b = find_rank(hist + (u64)i * HBINS, HBINS, sel[i].srank, &below);
    if (threadIdx.x == 0 && b < HBINS) sel[i].guess |= (u32)b;
}

// Shared by bracket_pass and tie_pass: per element, every selected model's value loaded first,
// then its key. `counting`: ST_PENDING models, counts below lo, the fine histogram and the
// guess's per-chunk counts; else ST_TIES models and their per-chunk counts of the guess alone.
// ANY: the slots may use any order (ascending magnitudes, SCE's variance); else every slot is
// ORDER_DESC (TIES), without the per-slot order test.
//
// The per-element work is kept small and free of branches on shared-memory values (which the
// compiler cannot prove uniform, so it would guard every warp vote): each slot's bracket, width
// and guess sit in registers, a slot that is not counted gets an empty bracket (lo 0, width 0)
// and guess 0 (every key has its top bit set, so none is 0), and the counts below lo and of the
// guess are per-thread, summed over the warp once per chunk (the guess's) or per block (below).
// Candidates (`counting`, a model with a guess): the elements inside the bracket with a key
// within CAND_SPAN of the guess, listed in cand[i * cand_cap ...] (count in cand_n[i]); found
// only on the rare branch of a warp with an element inside a bracket.
template <int MAXN, bool ANY>
__device__ __forceinline__ void count_body(const GtaModel* __restrict__ gmodels, SelModel* sel,
                                           const GtaArgs& a, u32* fine, u32* tie, u64 n_tchunks,
                                           u64* cand, u32* cand_n, u32 cand_cap, bool counting) {
    __shared__ GtaModel models[MAXN];
    __shared__ u32 eq[MAXN], s_lo[MAXN], s_w[MAXN], s_g[MAXN];
    __shared__ int s_on[MAXN];
    __shared__ int any, s_var;
    int n_models = a.n_models;
    int want = counting ? ST_PENDING : ST_TIES;
    for (int i = threadIdx.x; i < MAXN; i += blockDim.x) {
        int on = i < n_models && sel[i].active && sel[i].state == want;
        s_on[i] = on;
        s_lo[i] = on && counting ? sel[i].lo : 0;
        s_w[i] = on && counting ? sel[i].hi - sel[i].lo + 1 : 0;
        s_g[i] = on ? sel[i].guess : 0;
        eq[i] = 0;
        if (i < n_models) models[i] = gmodels[i];
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        any = 0;
        s_var = 0;
        for (int i = 0; i < n_models && i < MAXN; i++) {
            any |= s_on[i];
            s_var |= ANY && s_on[i] && models[i].order == ORDER_VAR;
        }
    }
    __syncthreads();
    if (!any) return;
    const bool var = ANY && s_var;
    int ord[MAXN];
    bool load[MAXN];
    u32 lo[MAXN], wd[MAXN], gs[MAXN];
    u32* fh[MAXN];
    unsigned cand_on = 0;  // bit i: list model i's candidates
#pragma unroll
    for (int i = 0; i < MAXN; i++) {
        if (counting && s_g[i] != 0 && s_w[i] != 0) cand_on |= 1u << i;
        ord[i] = ANY && i < n_models ? models[i].order : ORDER_DESC;
        load[i] = i < n_models && (s_on[i] || var);
        lo[i] = s_lo[i];
        wd[i] = s_w[i];
        gs[i] = s_g[i];
        fh[i] = counting ? fine + (u64)i * FINE_BINS : 0;
    }
    int lane = threadIdx.x & 31;
    // This thread's keys below lo: at most 16 per chunk, n / 256 in all (no overflow).
    u32 below_t[MAXN];
#pragma unroll
    for (int i = 0; i < MAXN; i++) below_t[i] = 0;
    for (u64 c = blockIdx.x; c < n_tchunks; c += gridDim.x) {
        u32 eq_t[MAXN];
#pragma unroll
        for (int i = 0; i < MAXN; i++) eq_t[i] = 0;
        // E consecutive elements per thread (4 up to 4 models: 16- or 8-byte loads; else 2);
        // counts ignore order.
        const int E = MAXN <= 4 ? 4 : 2;
        for (u64 j0 = c * TIE_CHUNK + E * threadIdx.x; j0 < (c + 1) * TIE_CHUNK;
             j0 += E * blockDim.x) {
            bool in0 = j0 < a.n;
            // Every input fetched, then decoded (`fetch`); allocations are padded to 16 bytes,
            // so a group may run past the end.
            Raw<E> rb, r[MAXN];
#pragma unroll
            for (int h = 0; h < E; h++) rb.w[h] = 0;
            if (in0) fetch<E>((const void*)a.base, a.base_dt, j0 / E, rb);
#pragma unroll
            for (int i = 0; i < MAXN; i++) {
#pragma unroll
                for (int h = 0; h < E; h++) r[i].w[h] = 0;
                if (load[i] && in0) fetch<E>((const void*)models[i].ptr, models[i].dt, j0 / E, r[i]);
            }
            float b[E];
            decode<E>(rb, a.base_dt, b);
            float x[MAXN][E];
#pragma unroll
            for (int i = 0; i < MAXN; i++) decode<E>(r[i], models[i].dt, x[i]);
#pragma unroll
            for (int h = 0; h < E; h++) {
                bool in = j0 + h < a.n;
                u32 vkey = 0xffffffffu;
                if (var && in) {
                    float d[MAXN];
#pragma unroll
                    for (int i = 0; i < MAXN; i++) d[i] = i < n_models ? x[i][h] - b[h] : 0.0f;
                    vkey = var_key_of(d, n_models < MAXN ? n_models : MAXN);
                }
                // Every slot, without a branch: one past n_models counts nothing (empty
                // bracket, guess 0).
#pragma unroll
                for (int i = 0; i < MAXN; i++) {
                    u32 key = !ANY                ? mag_key(x[i][h] - b[h])
                              : ord[i] == ORDER_VAR ? vkey
                                                    : order_key(x[i][h] - b[h], ord[i]);
                    eq_t[i] += (in && key == gs[i]) ? 1u : 0u;
                    if (counting) {
                        below_t[i] += (in && key < lo[i]) ? 1u : 0u;
                        // Keys equal to the guess are counted per chunk (eq_t) and added to
                        // the histogram by `resolve`: no atomics on a hot bin.
                        u32 off = key - lo[i];
                        bool inside = in && off < wd[i] && key != gs[i];
                        unsigned act = __ballot_sync(0xffffffffu, inside);
                        if (act != 0) {  // the warp's (rare) branch
                            bool c = inside && (cand_on >> i & 1u) &&
                                     key - gs[i] + CAND_SPAN <= 2u * CAND_SPAN;
                            u64 j = j0 + h;
                            agg_append(cand + (u64)i * cand_cap, cand_n + i, cand_cap,
                                       ((u64)key << 32) | j, c);
                            agg_add_act(fh[i], off, inside, act);
                        }
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models && __any_sync(0xffffffffu, eq_t[i] != 0)) {
                u32 e = eq_t[i];
                for (int off = 16; off > 0; off >>= 1) e += __shfl_down_sync(0xffffffffu, e, off);
                if (lane == 0 && e) atomicAdd(&eq[i], e);
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n_models && i < MAXN; i += blockDim.x) {
            if (s_on[i]) tie[(u64)i * n_tchunks + c] = eq[i];
            eq[i] = 0;
        }
        __syncthreads();
    }
    if (counting) {
#pragma unroll
        for (int i = 0; i < MAXN; i++) {
            if (i < n_models) {
                u64 v = below_t[i];
                for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
                if (lane == 0 && v)
                    atomicAdd((unsigned long long*)&sel[i].before, (unsigned long long)v);
            }
        }
    }
}

// Every element of the models in ST_PENDING: keys below lo counted, keys in [lo, hi]
// histogrammed (fine: [n_models][FINE_BINS]), keys equal to the guess counted per chunk
// (tie: [n_models][n_tchunks]), candidates listed (cand: [n_models][cand_cap], counts in
// cand_n, zeroed by the caller). Blocks take whole TIE_CHUNK chunks; blockDim.x == 256.
// tie_pass_*: per-chunk counts of key == guess for the models in ST_TIES (guess = their K).
// `_any` instances: slots in any order (see count_body).
// MINB, MINT: blocks of 256 threads per multiprocessor that the registers of bracket_pass and
// tie_pass must allow (the occupancy that the per-thread counts would otherwise take away;
// each as high as compiles without spills).
#define COUNT_INSTANCE(N, ANY, SUFFIX, MINB, MINT)                                           \
    extern "C" __global__ void __launch_bounds__(256, MINB)                                  \
        bracket_pass##SUFFIX##_##N(const GtaModel* models, SelModel* sel, GtaArgs a,         \
                                   u32* fine, u32* tie, u64 n_tchunks, u64* cand,            \
                                   u32* cand_n, u32 cand_cap) {                              \
        count_body<N, ANY>(models, sel, a, fine, tie, n_tchunks, cand, cand_n, cand_cap,     \
                           true);                                                            \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(256, MINT)                                  \
        tie_pass##SUFFIX##_##N(const GtaModel* models, SelModel* sel, GtaArgs a, u32* tie,   \
                               u64 n_tchunks) {                                              \
        count_body<N, ANY>(models, sel, a, 0, tie, n_tchunks, 0, 0, 0, false);               \
    }
COUNT_INSTANCE(4, false, , 5, 4)
COUNT_INSTANCE(8, false, , 3, 3)
COUNT_INSTANCE(16, false, , 2, 2)
COUNT_INSTANCE(4, true, _any, 3, 3)
COUNT_INSTANCE(8, true, _any, 2, 2)
COUNT_INSTANCE(16, true, _any, 1, 1)

// One block (1024 threads) per model in ST_PENDING or ST_TIES: K, then the cut. `cand`,
// `cand_n`: the bracket pass's candidates (looked at for models in ST_PENDING only).
extern "C" __global__ void resolve(GtaModel* models, SelModel* sel, GtaArgs a, u32* fine,
                                   const u32* tie, u64 n_tchunks, const u64* cand,
                                   const u32* cand_n, u32 cand_cap) {
    __shared__ int flags[1024];
    __shared__ u64 found;
    __shared__ u64 red[1024];
    __shared__ u32 kidx[1024];
    __shared__ u32 kn;
    int i = blockIdx.x;
    int t = threadIdx.x;
    SelModel s = sel[i];
    if (!s.active || (s.state != ST_PENDING && s.state != ST_TIES)) return;
    u32* f = fine + (u64)i * FINE_BINS;
    if (s.state == ST_PENDING && s.guess >= s.lo && s.guess <= s.hi) {
        // The guess's elements, counted per chunk by bracket_pass, into its histogram bin.
        u64 part = 0;
        for (u64 c = t; c < n_tchunks; c += 1024) part += tie[(u64)i * n_tchunks + c];
        red[t] = part;
        __syncthreads();
        for (int off = 512; off > 0; off >>= 1) {
            if (t < off) red[t] += red[t + off];
            __syncthreads();
        }
        if (t == 0) f[s.guess - s.lo] += (u32)red[0];
        __syncthreads();
    }
    u64 width = (u64)(s.hi - s.lo) + 1;
    if (s.p < s.before) {
        if (t == 0) sel[i].state = ST_MISSED;
        return;
    }
    u64 below;
    u64 b = find_rank(f, width, s.p - s.before, &below);
    if (b >= width) {
        if (t == 0) sel[i].state = ST_MISSED;
        return;
    }
    u32 K = s.lo + (u32)b;
    u64 less = s.before + below;
    u64 r = s.p - less;
    if (r == 0) {
        if (t == 0) {
            sel[i].key = K;
            sel[i].less = less;
            sel[i].cut = ((u64)K) << 32;
            models[i].cut = sel[i].cut;
            sel[i].state = ST_DONE;
        }
        return;
    }
    if (K != s.guess) {
        // The r-th element of K from the candidates, when they hold all of K's elements:
        // every element of K is inside the bracket (K is in it and is not the guess), so it was
        // listed if K is within CAND_SPAN of the guess and the list did not overflow.
        u32 m = f[b];
        if (cand != 0 && s.state == ST_PENDING && s.guess != 0 && m <= 1024 &&
            K - s.guess + CAND_SPAN <= 2u * CAND_SPAN && cand_n[i] <= cand_cap) {
            const u64* list = cand + (u64)i * cand_cap;
            u32 len = cand_n[i];
            if (t == 0) {
                kn = 0;
                found = ~0ull;
            }
            __syncthreads();
            for (u32 e = t; e < len; e += 1024) {
                u64 v = list[e];
                if ((u32)(v >> 32) == K) {
                    u32 at = atomicAdd(&kn, 1u);
                    if (at < 1024) kidx[at] = (u32)v;
                }
            }
            __syncthreads();
            if (kn == m) {
                // The element with exactly r of K's indices below its own.
                if ((u32)t < m) {
                    u32 mine = kidx[t], below_me = 0;
                    for (u32 u = 0; u < m; u++) below_me += kidx[u] < mine ? 1u : 0u;
                    if (below_me == r) found = mine;
                }
                __syncthreads();
                if (t == 0 && found != ~0ull) {
                    sel[i].key = K;
                    sel[i].less = less;
                    sel[i].cut = (((u64)K) << 32) | found;
                    models[i].cut = sel[i].cut;
                    sel[i].state = ST_DONE;
                }
                if (found != ~0ull) return;
            }
            __syncthreads();
        }
        if (t == 0) {
            sel[i].key = K;
            sel[i].less = less;
            sel[i].guess = K;
            sel[i].state = ST_TIES;
        }
        return;
    }
    // The r-th (0-based) element with key K in index order.
    u64 cb;
    u64 c = find_rank(tie + (u64)i * n_tchunks, n_tchunks, r, &cb);
    u64 rr = r - cb;
    if (t == 0) found = ~0ull;
    __syncthreads();
    u64 seen = 0;
    for (u64 base = c * TIE_CHUNK; base < (c + 1) * TIE_CHUNK && base < a.n; base += 1024) {
        u64 j = base + t;
        int fl = 0;
        if (j < a.n && j < (c + 1) * TIE_CHUNK)
            fl = model_key(models, i, a, load_elem((const void*)a.base, a.base_dt, j), j) == K;
        flags[t] = fl;
        __syncthreads();
        for (int off = 1; off < 1024; off <<= 1) {
            int v = t >= off ? flags[t - off] : 0;
            __syncthreads();
            flags[t] += v;
            __syncthreads();
        }
        // flags[t] is now the inclusive count up to thread t.
        if (fl && seen + flags[t] - 1 == rr) found = j;
        u64 total = flags[1023];
        __syncthreads();
        seen += total;
    }
    __syncthreads();
    if (t == 0) {
        sel[i].key = K;
        sel[i].less = less;
        if (found == ~0ull) {
            sel[i].state = ST_MISSED;  // cannot happen with consistent counts
        } else {
            sel[i].cut = (((u64)K) << 32) | found;
            models[i].cut = sel[i].cut;
            sel[i].state = ST_DONE;
        }
    }
}

// Exact path for models in ST_MISSED: the high 16 key bits of every element. hist:
// [n_models][HBINS].
extern "C" __global__ void full_hist(const GtaModel* models, const SelModel* sel, GtaArgs a,
                                     u32* hist) {
    int n_models = a.n_models;
    u64 stride = (u64)gridDim.x * blockDim.x;
    u64 rounds = (a.n + stride - 1) / stride;
    for (u64 r = 0; r < rounds; r++) {
        u64 j = (u64)blockIdx.x * blockDim.x + threadIdx.x + r * stride;
        bool in = j < a.n;
        float b = in ? load_elem((const void*)a.base, a.base_dt, j) : 0.0f;
        for (int i = 0; i < n_models; i++) {
            if (!sel[i].active || sel[i].state != ST_MISSED) continue;
            u32 key = in ? model_key(models, i, a, b, j) : 0;
            agg_add(hist + (u64)i * HBINS, key >> 16, in);
        }
    }
}

// One block (1024 threads) per model in ST_MISSED: the exact high bin as the bracket.
extern "C" __global__ void full_pick(SelModel* sel, const u32* hist) {
    int i = blockIdx.x;
    if (!sel[i].active || sel[i].state != ST_MISSED) return;
    u64 below;
    u64 b = find_rank(hist + (u64)i * HBINS, HBINS, sel[i].p, &below);
    if (threadIdx.x == 0) {
        if (b >= HBINS) b = HBINS - 1;
        sel[i].lo = (u32)(b << 16);
        sel[i].hi = (u32)((b << 16) | 0xffffu);
        sel[i].guess = 0;
        sel[i].before = 0;
        sel[i].state = ST_PENDING;
    }
}
