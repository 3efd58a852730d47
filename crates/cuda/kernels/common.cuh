// Shared device helpers: integer types, dtype decode/encode, Philox4x32-10.
// No #include: every kernel file is compiled by NVRTC as one program without include paths.

typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef long long i64;

// Element encodings (match `amalgam_cuda::DType` codes).
#define DT_F32 0
#define DT_F16 1
#define DT_BF16 2

__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

#ifdef AMALGAM_HOST_EMU
// The host emulator (`crates/cuda/emu`) converts in software.
__device__ __forceinline__ float f16_to_f32(u16 h) { return emu_f16_to_f32(h); }
#else
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
#endif

// Round to nearest even, quiet NaN as the `half` crate does (`bf16::from_f32`).
__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x40u);
    u32 r = x + 0x7fffu + ((x >> 16) & 1u);
    return (u16)(r >> 16);
}

#ifdef AMALGAM_HOST_EMU
__device__ __forceinline__ u16 f32_to_f16(float f) { return emu_f32_to_f16(f); }
#else
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ float load_elem(const void* p, int dt, u64 i) {
    if (dt == DT_F32) return ((const float*)p)[i];
    u16 h = ((const u16*)p)[i];
    return dt == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

__device__ __forceinline__ void store_elem(void* p, int dt, u64 i, float v) {
    if (dt == DT_F32) {
        ((float*)p)[i] = v;
    } else if (dt == DT_BF16) {
        ((u16*)p)[i] = f32_to_bf16(v);
    } else {
        ((u16*)p)[i] = f32_to_f16(v);
    }
}

// Load 8 consecutive elements 8g..8g+7 (the base pointer is 16-byte aligned).
__device__ __forceinline__ void load8(const void* p, int dt, u64 g, float v[8]) {
    if (dt == DT_F32) {
        const float4* q = (const float4*)p + 2 * g;
        float4 a = q[0], b = q[1];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
        uint4 w = ((const uint4*)p)[g];
        u32 ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u16 lo = (u16)(ws[k] & 0xffffu), hi = (u16)(ws[k] >> 16);
            if (dt == DT_BF16) {
                v[2 * k] = bf16_to_f32(lo);
                v[2 * k + 1] = bf16_to_f32(hi);
            } else {
                v[2 * k] = f16_to_f32(lo);
                v[2 * k + 1] = f16_to_f32(hi);
            }
        }
    }
}

__device__ __forceinline__ void store8(void* p, int dt, u64 g, const float v[8]) {
    if (dt == DT_F32) {
        float4* q = (float4*)p + 2 * g;
        q[0] = make_float4(v[0], v[1], v[2], v[3]);
        q[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        u32 ws[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            u16 lo, hi;
            if (dt == DT_BF16) {
                lo = f32_to_bf16(v[2 * k]);
                hi = f32_to_bf16(v[2 * k + 1]);
            } else {
                lo = f32_to_f16(v[2 * k]);
                hi = f32_to_f16(v[2 * k + 1]);
            }
            ws[k] = (u32)lo | ((u32)hi << 16);
        }
        ((uint4*)p)[g] = make_uint4(ws[0], ws[1], ws[2], ws[3]);
    }
}

// The raw bits of E consecutive elements Eg..Eg+E-1 (E = 2, 4 or 8; the base pointer is
// aligned to 4E bytes): 4-byte elements fill w[0..E), 2-byte ones w[0..E/2). A kernel fetches
// every input before it decodes any, so that all the loads are in flight together: decoding in
// the branch that loads (per input, on its encoding) makes the compiler wait there for the data
// before it issues the next input's load. HALF: the caller knows the encoding is f16 or bf16
// (no f32 path, whose registers would count).
template <int E>
struct Raw {
    u32 w[E];
};

template <int E, bool HALF = false>
__device__ __forceinline__ void fetch(const void* p, int dt, u64 g, Raw<E>& r) {
    if (!HALF && dt == DT_F32) {
        if (E == 8) {
            const uint4* q = (const uint4*)p + 2 * g;
            uint4 a = q[0], b = q[1];
            r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
            r.w[4 % E] = b.x; r.w[5 % E] = b.y; r.w[6 % E] = b.z; r.w[7 % E] = b.w;
        } else if (E == 4) {
            uint4 a = ((const uint4*)p)[g];
            r.w[0] = a.x; r.w[1 % E] = a.y; r.w[2 % E] = a.z; r.w[3 % E] = a.w;
        } else {
            uint2 a = ((const uint2*)p)[g];
            r.w[0] = a.x; r.w[1] = a.y;
        }
    } else {
        if (E == 8) {
            uint4 a = ((const uint4*)p)[g];
            r.w[0] = a.x; r.w[1] = a.y; r.w[2] = a.z; r.w[3] = a.w;
        } else if (E == 4) {
            uint2 a = ((const uint2*)p)[g];
            r.w[0] = a.x; r.w[1] = a.y;
        } else {
            r.w[0] = ((const u32*)p)[g];
        }
    }
}

template <int E, bool HALF = false>
__device__ __forceinline__ void decode(const Raw<E>& r, int dt, float* v) {
    // One branch per input, not per element.
    if (!HALF && dt == DT_F32) {
#pragma unroll
        for (int k = 0; k < E; k++) v[k] = __uint_as_float(r.w[k]);
    } else if (dt == DT_BF16) {
#pragma unroll
        for (int k = 0; k < E / 2; k++) {
            v[2 * k] = __uint_as_float(r.w[k] << 16);
            v[2 * k + 1] = __uint_as_float(r.w[k] & 0xffff0000u);
        }
    } else {
#pragma unroll
        for (int k = 0; k < E / 2; k++) {
            v[2 * k] = f16_to_f32((u16)(r.w[k] & 0xffffu));
            v[2 * k + 1] = f16_to_f32((u16)(r.w[k] >> 16));
        }
    }
}

// Record the lowest flat index of a non-finite input value per input slot, as ~index in a
// zero-initialised slot (so the largest value wins).
__device__ __forceinline__ void note_nonfinite(u64* bad, int slot, float v, u64 idx) {
    if (!isfinite(v)) atomicMax((unsigned long long*)(bad + slot), (unsigned long long)~idx);
}

// Load 4 consecutive elements 4g..4g+3 (the base pointer is 16-byte aligned).
__device__ __forceinline__ void load4(const void* p, int dt, u64 g, float v[4]) {
    if (dt == DT_F32) {
        float4 a = ((const float4*)p)[g];
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    } else {
        uint2 w = ((const uint2*)p)[g];
        u16 h[4] = {(u16)(w.x & 0xffffu), (u16)(w.x >> 16), (u16)(w.y & 0xffffu), (u16)(w.y >> 16)};
#pragma unroll
        for (int k = 0; k < 4; k++) v[k] = dt == DT_BF16 ? bf16_to_f32(h[k]) : f16_to_f32(h[k]);
    }
}

__device__ __forceinline__ void store4(void* p, int dt, u64 g, const float v[4]) {
    if (dt == DT_F32) {
        ((float4*)p)[g] = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        u16 h[4];
#pragma unroll
        for (int k = 0; k < 4; k++) h[k] = dt == DT_BF16 ? f32_to_bf16(v[k]) : f32_to_f16(v[k]);
        ((uint2*)p)[g] = make_uint2((u32)h[0] | ((u32)h[1] << 16), (u32)h[2] | ((u32)h[3] << 16));
    }
}

// Philox4x32-10 (Random123 `philox4x32_R(10, ctr, key)`), as `amalgam_core::philox`.
__device__ __forceinline__ u32 philox_word0(u32 c0, u32 c1, u32 c2, u32 c3, u32 k0, u32 k1) {
#pragma unroll
    for (int r = 0; r < 10; r++) {
        if (r > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        u32 hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        u32 hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        u32 n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    return c0;
}

// The kernel's dynamic shared memory as an array of T (the host emulator provides its own).
#ifndef AMALGAM_HOST_EMU
#define DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

// Grid-stride loop bounds.
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// Warp-stride loop bounds: each warp of the grid takes w = its index, then steps by the grid's
// warps (warp-uniform: every lane of a warp runs the same iterations).
#define WARP_STRIDE(w, n)                                                   \
    for (u64 w = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; w < (n); \
         w += ((u64)gridDim.x * blockDim.x) >> 5)

// Warps per block of the warp-per-segment sums (sce_sq, gram_seq), whose shared tiles hold
// SEQ_WARPS warps: the host's grid_for blocks (`device::GRID_THREADS` / 32; a test keeps them
// equal).
#define SEQ_WARPS 8
