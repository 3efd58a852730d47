// Conjugate gradient kept on the device (src/cg.rs): SciPy's CG as amalgam_core::solve::cg runs
// it, with the matvec in cuBLAS and everything else here. Every scalar step (the convergence
// test, alpha, beta, the breakdown test) is computed on the device from device scalars kept in
// one `state` array of 8 doubles, so no vector ever goes back to the host; once `state[CG_STATUS]`
// is not CG_RUNNING every kernel of the iteration does nothing, which lets the host enqueue an
// iteration before it has read whether the previous one stopped.
//
// Dot products are deterministic and independent of the device: element i belongs to chunk
// i / CG_CHUNK; the block of a chunk has CG_THREADS threads, thread t sums the elements
// t, t + CG_THREADS, ... of the chunk in order, and a fixed shared-memory tree adds the threads'
// sums; the chunk partials are then added by one block the same way (cg_reduce). Launch the
// chunked kernels with exactly one block of CG_THREADS threads per chunk.

#define CG_THREADS 256
#define CG_CHUNK 16384

// Slots of `state` (mirrored in cg.rs).
#define CG_RHO 0
#define CG_RHO_PREV 1
#define CG_PQ 2
#define CG_ALPHA 3
#define CG_TOL 4
#define CG_STATUS 5
#define CG_ITER 6
#define CG_AUX 7

// Values of state[CG_STATUS] (mirrored in cg.rs).
#define CG_RUNNING 0.0
#define CG_CONVERGED 1.0
#define CG_BREAKDOWN 2.0
#define CG_BAD_RHO 3.0
#define CG_BAD_PQ 4.0

// Operations of cg_reduce (mirrored in cg.rs).
#define CG_OP_STORE 0
#define CG_OP_RHO 1
#define CG_OP_PQ 2

// Sum of the block's `v` over its CG_THREADS threads by a fixed tree (every thread gets it).
__device__ __forceinline__ double cg_block_sum(double v, double* sh) {
    sh[threadIdx.x] = v;
    __syncthreads();
#pragma unroll
    for (int s = CG_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) sh[threadIdx.x] = sh[threadIdx.x] + sh[threadIdx.x + s];
        __syncthreads();
    }
    return sh[0];
}

__device__ __forceinline__ u64 cg_chunk_end(u64 n) {
    u64 end = (u64)blockIdx.x * CG_CHUNK + CG_CHUNK;
    return end < n ? end : n;
}

// partials[c] = sum over chunk c of a[i] * b[i].
extern "C" __global__ void cg_dot(const double* a, const double* b, u64 n, double* partials) {
    __shared__ double sh[CG_THREADS];
    u64 end = cg_chunk_end(n);
    double s = 0.0;
#pragma unroll 4
    for (u64 i = (u64)blockIdx.x * CG_CHUNK + threadIdx.x; i < end; i += CG_THREADS) s += a[i] * b[i];
    double t = cg_block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = t;
}

// partials[c] = number of nonzero (or NaN) entries of x in chunk c.
extern "C" __global__ void cg_nnz(const double* x, u64 n, double* partials) {
    __shared__ double sh[CG_THREADS];
    u64 end = cg_chunk_end(n);
    double s = 0.0;
#pragma unroll 4
    for (u64 i = (u64)blockIdx.x * CG_CHUNK + threadIdx.x; i < end; i += CG_THREADS) {
        if (x[i] != 0.0) s += 1.0;
    }
    double t = cg_block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = t;
}

// Add the `np` partials (one block of CG_THREADS threads) and apply `op`:
// - CG_OP_STORE: state[arg] = sum;
// - CG_OP_RHO (top of iteration `arg`): rho = sum; stop as converged when sqrt(rho) < tol or
//   rho == 0 (SciPy's strict test, before the step), as CG_BAD_RHO when rho is not finite;
// - CG_OP_PQ (iteration `arg`): pq = sum; stop as CG_BAD_PQ when not finite, as CG_BREAKDOWN
//   when pq == 0; else alpha = rho / pq and rho_prev = rho.
// A stopped solve (status not CG_RUNNING) is left as it is by CG_OP_RHO and CG_OP_PQ.
extern "C" __global__ void cg_reduce(const double* partials, u64 np, double* state, int op, int arg) {
    __shared__ double sh[CG_THREADS];
    double s = 0.0;
    for (u64 i = threadIdx.x; i < np; i += CG_THREADS) s += partials[i];
    double total = cg_block_sum(s, sh);
    if (threadIdx.x != 0) return;
    if (op == CG_OP_STORE) {
        state[arg] = total;
        return;
    }
    if (state[CG_STATUS] != CG_RUNNING) return;
    if (op == CG_OP_RHO) {
        state[CG_RHO] = total;
        if (!isfinite(total)) {
            state[CG_ITER] = (double)arg;
            state[CG_STATUS] = CG_BAD_RHO;
        } else if (sqrt(total) < state[CG_TOL] || total == 0.0) {
            state[CG_ITER] = (double)arg;
            state[CG_STATUS] = CG_CONVERGED;
        }
    } else if (op == CG_OP_PQ) {
        state[CG_PQ] = total;
        if (!isfinite(total)) {
            state[CG_ITER] = (double)arg;
            state[CG_STATUS] = CG_BAD_PQ;
        } else if (total == 0.0) {
            state[CG_ITER] = (double)arg;
            state[CG_STATUS] = CG_BREAKDOWN;
        } else {
            double rho = state[CG_RHO];
            state[CG_ALPHA] = rho / total;
            state[CG_RHO_PREV] = rho;
        }
    }
}

// p = r (first != 0) or p = (rho / rho_prev) * p + r, as the CPU: `p *= beta; p += r`.
extern "C" __global__ void cg_direction(double* p, const double* r, u64 n, const double* state, int first) {
    if (state[CG_STATUS] != CG_RUNNING) return;
    if (first) {
        GRID_STRIDE(i, n) p[i] = r[i];
        return;
    }
    double beta = state[CG_RHO] / state[CG_RHO_PREV];
    GRID_STRIDE(i, n) {
        double v = p[i] * beta;
        p[i] = v + r[i];
    }
}

// x += alpha p; r -= alpha q (alpha = state[CG_ALPHA]); partials[c] = sum over chunk c of the new
// r[i] * r[i] (the next iteration's rho). One block of CG_THREADS threads per chunk.
extern "C" __global__ void cg_update(double* x, double* r, const double* p, const double* q, u64 n,
                                     const double* state, double* partials) {
    __shared__ double sh[CG_THREADS];
    // Uniform over the grid: no kernel writes the state while this one runs.
    if (state[CG_STATUS] != CG_RUNNING) return;
    double alpha = state[CG_ALPHA];
    u64 end = cg_chunk_end(n);
    double s = 0.0;
#pragma unroll 4
    for (u64 i = (u64)blockIdx.x * CG_CHUNK + threadIdx.x; i < end; i += CG_THREADS) {
        double ap = alpha * p[i];
        x[i] = x[i] + ap;
        double aq = alpha * q[i];
        double ri = r[i] - aq;
        r[i] = ri;
        s += ri * ri;
    }
    double t = cg_block_sum(s, sh);
    if (threadIdx.x == 0) partials[blockIdx.x] = t;
}

// y = b - y.
extern "C" __global__ void cg_residual(const double* b, double* y, u64 n) {
    GRID_STRIDE(i, n) y[i] = b[i] - y[i];
}

// y = f * x (a diagonal operator), as the CPU: `f[i] * x[i]`.
extern "C" __global__ void cg_diag(const double* f, const double* x, double* y, u64 n) {
    GRID_STRIDE(i, n) y[i] = f[i] * x[i];
}
