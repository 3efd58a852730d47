// A host emulator for the CUDA C kernels of `crates/cuda/kernels`, for tests on machines without
// a GPU (`amalgam_cuda::emu`): the kernel sources are compiled by the host's C++ compiler after
// this header, and a launch runs the grid's blocks one after another, each block's threads as
// cooperative fibers on one OS thread. `__syncthreads` and the warp intrinsics
// (`__ballot_sync`, `__any_sync`, `__shfl*_sync`, `__match_any_sync`, `__syncwarp`) switch to
// the scheduler, which releases a barrier when every live thread of the block waits at it and a
// warp operation when every lane named in its mask waits at one with that mask. `__shared__`
// variables are static (blocks never overlap), atomics are plain read-modify-writes (one thread
// runs at a time).
//
// This checks the kernels' logic (indexing, synchronisation, selection, sorting), not their
// speed, and not what only a device shows (memory model, occupancy, real rounding of the f16
// conversion instructions: these are software conversions here).

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <algorithm>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>

#define AMALGAM_HOST_EMU 1

namespace emu {

struct Dim3 {
    unsigned x, y, z;
};

enum State { RUN, BARRIER, WARP, DONE };
enum WarpOp { OP_BALLOT, OP_SHFL, OP_SHFL_UP, OP_SHFL_DOWN, OP_MATCH_ANY };

// Switching between fibers: on x86-64 a few instructions (callee-saved registers, the stack
// pointer, the SSE and x87 control words), elsewhere ucontext (which also saves the signal mask,
// a system call per switch).
#if defined(__x86_64__)
extern "C" void amalgam_emu_switch(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl amalgam_emu_switch
    .hidden amalgam_emu_switch
    .type amalgam_emu_switch,@function
amalgam_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size amalgam_emu_switch, .-amalgam_emu_switch
)");
struct Context {
    void* sp = nullptr;
};
static void entry();
// A fresh context that starts `entry` on the stack [base, base + size).
static void make_context(Context& c, char* base, size_t size) {
    uintptr_t top = ((uintptr_t)(base + size)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;          // entry's return address (it never returns)
    *--sp = (void*)&entry;    // where the first switch returns to
    for (int i = 0; i < 6; i++) *--sp = nullptr;  // rbp rbx r12-r15
    sp--;
    unsigned mxcsr = 0x1f80;
    unsigned short fcw = 0x037f;
    memcpy((char*)sp, &mxcsr, 4);
    memcpy((char*)sp + 4, &fcw, 2);
    c.sp = sp;
}
static void switch_context(Context& from, Context& to) { amalgam_emu_switch(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};
static void entry();
static void make_context(Context& c, char* base, size_t size) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = base;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}
static void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

struct Fiber {
    Context ctx;
    State state;
    Dim3 tid;
    unsigned flat;
    // The pending warp operation.
    WarpOp op;
    unsigned mask;
    unsigned long long val;
    int arg;
    unsigned long long res;
};

static const size_t STACK = 256 * 1024;

struct Block {
    std::vector<Fiber> fibers;
    std::vector<char*> stacks;
    Context sched;
    Fiber* cur = nullptr;
    Dim3 block_idx{0, 0, 0}, block_dim{1, 1, 1}, grid_dim{1, 1, 1};
    std::vector<unsigned long long> smem;  // dynamic shared memory (8-byte aligned)
    std::function<void()> body;
    const char* kernel = "";
};

static Block B;

[[noreturn]] static void fail(const char* what) {
    fprintf(stderr, "host emulator: %s in kernel %s (block %u,%u,%u)\n", what, B.kernel,
            B.block_idx.x, B.block_idx.y, B.block_idx.z);
    abort();
}

static void yield(State s) {
    Fiber* f = B.cur;
    f->state = s;
    switch_context(f->ctx, B.sched);
}

static void entry() {
    B.body();
    yield(DONE);
    fail("a finished thread was resumed");
}

static void sync_block() { yield(BARRIER); }

// Complete every warp operation whose lanes all wait; true when one completed.
static bool complete_warps() {
    bool any = false;
    size_t n = B.fibers.size();
    for (size_t w0 = 0; w0 < n; w0 += 32) {
        size_t w1 = std::min(n, w0 + 32);
        for (size_t l = w0; l < w1; l++) {
            Fiber& f = B.fibers[l];
            if (f.state != WARP) continue;
            unsigned mask = f.mask;
            WarpOp op = f.op;
            bool ready = true;
            for (size_t k = w0; k < w1; k++) {
                if (!(mask >> (k - w0) & 1u)) continue;
                Fiber& g = B.fibers[k];
                if (g.state == DONE) fail("a warp operation names a lane that has exited");
                if (g.state != WARP || g.mask != mask) ready = false;
                else if (g.op != op) fail("lanes of one warp operation disagree on the operation");
            }
            if (!ready) continue;
            if (!(mask >> (l - w0) & 1u)) fail("a lane is not in its own warp operation's mask");
            unsigned ballot = 0;
            for (size_t k = w0; k < w1; k++)
                if ((mask >> (k - w0) & 1u) && B.fibers[k].val) ballot |= 1u << (k - w0);
            for (size_t k = w0; k < w1; k++) {
                if (!(mask >> (k - w0) & 1u)) continue;
                Fiber& g = B.fibers[k];
                int lane = (int)(k - w0);
                int width = (int)(w1 - w0);
                switch (op) {
                    case OP_BALLOT:
                        g.res = ballot;
                        break;
                    case OP_SHFL: {
                        int src = g.arg & 31;
                        if (src >= width || !(mask >> src & 1u)) fail("shuffle from an inactive lane");
                        g.res = B.fibers[w0 + src].val;
                        break;
                    }
                    case OP_SHFL_UP: {
                        int src = lane - g.arg;
                        g.res = src >= 0 ? B.fibers[w0 + src].val : g.val;
                        break;
                    }
                    case OP_SHFL_DOWN: {
                        int src = lane + g.arg;
                        g.res = src < 32 && src < width ? B.fibers[w0 + src].val : g.val;
                        break;
                    }
                    case OP_MATCH_ANY: {
                        unsigned m = 0;
                        for (size_t q = w0; q < w1; q++)
                            if ((mask >> (q - w0) & 1u) && B.fibers[q].val == g.val)
                                m |= 1u << (q - w0);
                        g.res = m;
                        break;
                    }
                }
            }
            for (size_t k = w0; k < w1; k++)
                if (mask >> (k - w0) & 1u) B.fibers[k].state = RUN;
            any = true;
        }
    }
    return any;
}

static void run_block() {
    size_t n = B.fibers.size();
    for (size_t t = 0; t < n; t++) {
        Fiber& f = B.fibers[t];
        f.state = RUN;
        make_context(f.ctx, B.stacks[t], STACK);
    }
    // Threads run up to their next synchronisation point in turn, in thread order on even
    // rounds and in reverse on odd ones: a read of shared memory that a missing barrier leaves
    // racing with a write sees the write on one round and not on the other.
    size_t round = 0;
    for (;;) {
        bool ran = false;
        bool reverse = (round++ & 1) != 0;
        for (size_t u = 0; u < n; u++) {
            size_t t = reverse ? n - 1 - u : u;
            Fiber& f = B.fibers[t];
            if (f.state != RUN) continue;
            B.cur = &f;
            switch_context(B.sched, f.ctx);
            ran = true;
        }
        B.cur = nullptr;
        if (complete_warps()) continue;
        size_t live = 0, waiting = 0;
        for (auto& f : B.fibers) {
            if (f.state != DONE) live++;
            if (f.state == BARRIER) waiting++;
        }
        if (live == 0) return;
        if (waiting == live) {
            for (auto& f : B.fibers)
                if (f.state == BARRIER) f.state = RUN;
            continue;
        }
        if (!ran) fail("deadlock (threads wait at different synchronisation points)");
    }
}

template <class T>
static unsigned long long bits_of(T v) {
    static_assert(sizeof(T) <= 8, "warp values are at most 8 bytes");
    unsigned long long b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}

template <class T>
static T of_bits(unsigned long long b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

static unsigned long long warp_op(WarpOp op, unsigned mask, unsigned long long val, int arg) {
    Fiber* f = B.cur;
    f->op = op;
    f->mask = mask;
    f->val = val;
    f->arg = arg;
    yield(WARP);
    return f->res;
}

// Run `f(args...)` over the grid; args[i] points at the i-th parameter's value, as in
// cuLaunchKernel.
template <class... A, size_t... I>
static void launch_with(void (*f)(A...), void** args, std::index_sequence<I...>) {
    B.body = [f, args]() { f(*static_cast<std::remove_reference_t<A>*>(args[I])...); };
}

template <class... A>
static void launch(const char* name, void (*f)(A...), Dim3 grid, Dim3 block, size_t smem,
                   void** args) {
    launch_with(f, args, std::index_sequence_for<A...>{});
    B.kernel = name;
    B.grid_dim = grid;
    B.block_dim = block;
    size_t threads = (size_t)block.x * block.y * block.z;
    if (threads == 0 || threads > 1024) fail("a block of more than 1024 threads");
    B.fibers.assign(threads, Fiber{});
    while (B.stacks.size() < threads) B.stacks.push_back((char*)malloc(STACK));
    for (unsigned z = 0, t = 0; z < block.z; z++)
        for (unsigned y = 0; y < block.y; y++)
            for (unsigned x = 0; x < block.x; x++, t++) {
                B.fibers[t].tid = Dim3{x, y, z};
                B.fibers[t].flat = t;
            }
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                B.block_idx = Dim3{x, y, z};
                // Shared memory starts undefined on a device: fill it with garbage.
                B.smem.assign(smem / 8 + 1, 0xa5a5a5a5a5a5a5a5ull);
                run_block();
            }
}

}  // namespace emu

// ---- CUDA C built-ins

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define threadIdx (emu::B.cur->tid)
#define blockIdx (emu::B.block_idx)
#define blockDim (emu::B.block_dim)
#define gridDim (emu::B.grid_dim)
#define DYNAMIC_SHARED(T, name) T* name = (T*)emu::B.smem.data()

static inline void __syncthreads() { emu::sync_block(); }

static inline unsigned __ballot_sync(unsigned mask, int pred) {
    return (unsigned)emu::warp_op(emu::OP_BALLOT, mask, pred ? 1 : 0, 0);
}
static inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
static inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)__ballot_sync(mask, 1); }
template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src) {
    return emu::of_bits<T>(emu::warp_op(emu::OP_SHFL, mask, emu::bits_of(v), src));
}
template <class T>
static inline T __shfl_up_sync(unsigned mask, T v, unsigned d) {
    return emu::of_bits<T>(emu::warp_op(emu::OP_SHFL_UP, mask, emu::bits_of(v), (int)d));
}
template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
    return emu::of_bits<T>(emu::warp_op(emu::OP_SHFL_DOWN, mask, emu::bits_of(v), (int)d));
}
template <class T>
static inline unsigned __match_any_sync(unsigned mask, T v) {
    return (unsigned)emu::warp_op(emu::OP_MATCH_ANY, mask, emu::bits_of(v), 0);
}

template <class T>
static inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
template <class T>
static inline T atomicMax(T* p, T v) {
    T old = *p;
    if (v > old) *p = v;
    return old;
}

static inline int __popc(unsigned x) { return __builtin_popcount(x); }
static inline int __ffs(int x) { return __builtin_ffs(x); }
static inline unsigned __umulhi(unsigned a, unsigned b) {
    return (unsigned)(((unsigned long long)a * b) >> 32);
}
static inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
static inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline int max(int a, int b) { return a > b ? a : b; }
static inline int min(int a, int b) { return a < b ? a : b; }

// The f16 conversions the kernels do with PTX `cvt` (round to nearest even).
static inline float emu_f16_to_f32(unsigned short h) { return (float)__builtin_bit_cast(_Float16, h); }
static inline unsigned short emu_f32_to_f16(float f) {
    return __builtin_bit_cast(unsigned short, (_Float16)f);
}

struct __attribute__((aligned(8))) float2 {
    float x, y;
};
struct __attribute__((aligned(16))) float4 {
    float x, y, z, w;
};
struct __attribute__((aligned(8))) uint2 {
    unsigned x, y;
};
struct __attribute__((aligned(16))) uint4 {
    unsigned x, y, z, w;
};
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
static inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) {
    return uint4{x, y, z, w};
}
