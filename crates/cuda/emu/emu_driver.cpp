// An emulated CUDA device for tests on machines without a GPU (`amalgam_cuda::emu`): the
// subset of the CUDA driver API and of cuBLAS that cudarc calls for amalgam, over host memory,
// built after `host_emu.h` and the kernel program into one shared library that stands for both
// libcuda.so and libcublas.so. Everything runs synchronously on the calling thread: streams
// and events keep no queue, launches from several threads take turns (an event's time is when it was recorded); a kernel launch runs the
// kernel's host-compiled source (`cuModuleLoadData` ignores the PTX it is given, which NVRTC
// still compiled); DGEMM is a naive loop in f64. `AMALGAM_EMU_DEVICES` devices (default 1) that
// share the host's memory, each of `AMALGAM_EMU_SMS` multiprocessors (default 2). The library
// also stands for libnccl.so: communicators of ranks on threads of this process, whose f64 sums
// add the ranks' values in rank order.

#include <chrono>
#include <condition_variable>
#include <unistd.h>
#include <map>
#include <mutex>
#include <string>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;

namespace emu_driver {

struct Event {
    double ms = 0.0;
};

static std::mutex LOCK;
static std::map<unsigned long long, size_t> ALLOCS;  // device allocations by address
static int CONTEXT = 1;                              // the one context's handle target

static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

static void* alloc(size_t bytes) {
    size_t size = (bytes + 255) / 256 * 256 + 256;
    void* p = aligned_alloc(256, size);
    if (p) memset(p, 0xcd, size);  // device memory starts undefined
    return p;
}

static int devices() {
    const char* s = getenv("AMALGAM_EMU_DEVICES");
    int n = s ? atoi(s) : 1;
    return n > 0 ? n : 1;
}

// Shared memory a block may opt in to: `AMALGAM_EMU_SMEM_OPTIN` bytes (default 227 KiB, as an
// H100's; below 128 KiB the backend takes its small-shared-memory paths).
static int smem_optin() {
    const char* s = getenv("AMALGAM_EMU_SMEM_OPTIN");
    int n = s ? atoi(s) : 227 << 10;
    return n >= (48 << 10) ? n : 48 << 10;
}

static int sms() {
    const char* s = getenv("AMALGAM_EMU_SMS");
    int n = s ? atoi(s) : 2;
    return n > 0 ? n : 2;
}

// The kernels by name (the launch table after this file).
typedef int (*Launch)(const char*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                      size_t, void**);

struct Function {
    std::string name;
};

}  // namespace emu_driver

using namespace emu_driver;

extern "C" int amalgam_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz,
                                  unsigned bx, unsigned by, unsigned bz, size_t smem, void** args);

#define API extern "C" __attribute__((visibility("default")))
#define OK 0
#define INVALID 1

// ---- driver: initialisation, device, context

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = devices();
    return OK;
}
API CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal < 0 || ordinal >= devices()) return 101;  // CUDA_ERROR_INVALID_DEVICE
    *d = ordinal;
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "amalgam host emulator");
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = (size_t)8 << 30;
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice) {
    switch (attr) {
        case 1: *v = 1024; break;            // max threads per block
        case 8: *v = 48 << 10; break;        // shared memory per block
        case 10: *v = 32; break;             // warp size
        case 16: *v = sms(); break;          // multiprocessors
        case 75: *v = 9; break;              // compute capability
        case 76: *v = 0; break;
        case 97: *v = smem_optin(); break;   // shared memory per block, opt-in
        case 115: *v = 0; break;             // memory pools: no (cuMemAlloc)
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, CUdevice) {
    *ctx = &CONTEXT;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
API CUresult cuCtxSetCurrent(void*) { return OK; }
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = &CONTEXT;
    return OK;
}
API CUresult cuCtxSynchronize() { return OK; }
API CUresult cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return OK;
}
API CUresult cuGetErrorString(CUresult, const char** s) {
    *s = "error in the host emulator";
    return OK;
}
API CUresult cuGetErrorName(CUresult, const char** s) {
    *s = "CUDA_ERROR_EMULATOR";
    return OK;
}

// ---- streams and events (everything has happened by the time a call returns)

API CUresult cuStreamCreate(void** s, unsigned) {
    *s = new int(0);
    return OK;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned, int) {
    *s = new int(0);
    return OK;
}
API CUresult cuStreamDestroy_v2(void* s) {
    delete (int*)s;
    return OK;
}
API CUresult cuStreamSynchronize(void*) { return OK; }
API CUresult cuStreamQuery(void*) { return OK; }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }
API CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return OK;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
API CUresult cuEventRecord(void* e, void*) {
    ((Event*)e)->ms = now_ms();
    return OK;
}
API CUresult cuEventRecordWithFlags(void* e, void*, unsigned) {
    ((Event*)e)->ms = now_ms();
    return OK;
}
API CUresult cuEventSynchronize(void*) { return OK; }
API CUresult cuEventQuery(void*) { return OK; }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(((Event*)b)->ms - ((Event*)a)->ms);
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) {
    return cuEventElapsedTime(ms, a, b);
}

// ---- memory

API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    void* q = alloc(bytes);
    if (!q) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    std::lock_guard<std::mutex> g(LOCK);
    ALLOCS[(unsigned long long)q] = bytes;
    *p = (CUdeviceptr)q;
    return OK;
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, void*) { return cuMemAlloc_v2(p, bytes); }
API CUresult cuMemFree_v2(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(LOCK);
    if (!ALLOCS.erase(p)) return INVALID;
    free((void*)p);
    return OK;
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void*) { return cuMemFree_v2(p); }
API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    // `AMALGAM_EMU_FREE_BYTES`: the free memory reported (default 6 GiB).
    const char* f = getenv("AMALGAM_EMU_FREE_BYTES");
    *free_b = f ? (size_t)strtoull(f, nullptr, 10) : (size_t)6 << 30;
    *total = (size_t)8 << 30;
    return OK;
}
API CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) {
    *p = alloc(bytes);
    return *p ? OK : 2;
}
API CUresult cuMemAllocHost_v2(void** p, size_t bytes) { return cuMemHostAlloc(p, bytes, 0); }
API CUresult cuMemFreeHost(void* p) {
    free(p);
    return OK;
}
API CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return OK; }
API CUresult cuMemHostUnregister(void*) { return OK; }
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    memcpy((void*)d, h, n);
    return OK;
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void*) {
    return cuMemcpyHtoD_v2(d, h, n);
}
API CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    memcpy(h, (const void*)d, n);
    return OK;
}
API CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void*) {
    return cuMemcpyDtoH_v2(h, d, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    memmove((void*)d, (const void*)s, n);
    return OK;
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr s, size_t n, void*) {
    return cuMemcpyDtoD_v2(d, s, n);
}
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    memset((void*)d, v, n);
    return OK;
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void*) {
    return cuMemsetD8_v2(d, v, n);
}
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void*) {
    for (size_t i = 0; i < n; i++) ((unsigned*)d)[i] = v;
    return OK;
}

// ---- modules and launches

API CUresult cuModuleLoadData(void** m, const void*) {
    *m = new int(0);
    return OK;
}
API CUresult cuModuleUnload(void* m) {
    delete (int*)m;
    return OK;
}
API CUresult cuModuleGetFunction(void** f, void*, const char* name) {
    // Known names only: a launch with no arguments would fail for the others.
    *f = new Function{name};
    return OK;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return OK; }
API CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned smem, void*, void** params,
                            void**) {
    Function* fn = (Function*)f;
    if (smem > (unsigned)smem_optin()) return INVALID;
    // One launch at a time (the emulator's state is global): the parts of a split solve launch
    // from their own threads.
    static std::mutex launches;
    std::lock_guard<std::mutex> g(launches);
    if (getenv("AMALGAM_EMU_TRACE")) fprintf(stderr, "emu launch %s <<<%u,%u>>>\n", fn->name.c_str(), gx, bx);
    return amalgam_emu_launch(fn->name.c_str(), gx, gy, gz, bx, by, bz, smem, params) == 0
               ? OK
               : 500;  // CUDA_ERROR_NOT_FOUND
}

// ---- cuBLAS: column-major DGEMM, naive, in f64

typedef int cublasStatus_t;
enum { OP_N = 0, OP_T = 1, OP_C = 2 };

API cublasStatus_t cublasCreate_v2(void** h) {
    *h = new int(0);
    return 0;
}
API cublasStatus_t cublasDestroy_v2(void* h) {
    delete (int*)h;
    return 0;
}
API cublasStatus_t cublasSetStream_v2(void*, void*) { return 0; }
API cublasStatus_t cublasSetMathMode(void*, int) { return 0; }
API cublasStatus_t cublasSetPointerMode_v2(void*, int) { return 0; }
API cublasStatus_t cublasSetWorkspace_v2(void*, void*, size_t) { return 0; }
API cublasStatus_t cublasDgemm_v2(void*, int ta, int tb, int m, int n, int k, const double* alpha,
                                  const double* A, int lda, const double* B, int ldb,
                                  const double* beta, double* C, int ldc) {
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            double acc = 0.0;
            for (int l = 0; l < k; l++) {
                double a = ta == OP_N ? A[i + (size_t)l * lda] : A[l + (size_t)i * lda];
                double b = tb == OP_N ? B[l + (size_t)j * ldb] : B[j + (size_t)l * ldb];
                acc += a * b;
            }
            double* c = &C[i + (size_t)j * ldc];
            *c = *beta == 0.0 ? *alpha * acc : *alpha * acc + *beta * *c;
        }
    }
    return 0;
}

// ---- NCCL: ranks on threads of this process

typedef int ncclResult_t;
struct ncclUniqueId {
    char internal[128];
};

namespace emu_driver {

// The ranks of one unique id.
struct Clique {
    int n = 0;
    int joined = 0;
    // The all-reduce in progress: each rank's buffers, and the round it belongs to.
    std::vector<const double*> send;
    std::vector<double*> recv;
    size_t count = 0;
    int arrived = 0;
    unsigned long long round = 0;
    bool failed = false;
};

struct Comm {
    Clique* clique;
    int rank;
};

static std::mutex NCCL;
static std::condition_variable NCCL_CV;
static std::map<std::string, Clique*> CLIQUES;
static unsigned long long NEXT_ID = 1;
static unsigned long long ALL_REDUCES = 0;
static int MAX_RANKS = 0;

}  // namespace emu_driver

API ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    std::lock_guard<std::mutex> g(NCCL);
    memset(id->internal, 0, sizeof id->internal);
    snprintf(id->internal, sizeof id->internal, "amalgam-emu-%llu-%d", NEXT_ID++, (int)getpid());
    return 0;
}
API ncclResult_t ncclGetVersion(int* v) {
    *v = 22800;
    return 0;
}
API const char* ncclGetErrorString(ncclResult_t) { return "error in the emulated NCCL"; }
API ncclResult_t ncclCommInitRank(void** comm, int nranks, ncclUniqueId id, int rank) {
    if (nranks < 1 || rank < 0 || rank >= nranks) return 4;  // ncclInvalidArgument
    std::unique_lock<std::mutex> g(NCCL);
    std::string key(id.internal, strnlen(id.internal, sizeof id.internal));
    Clique*& c = CLIQUES[key];
    if (!c) {
        c = new Clique();
        c->n = nranks;
        c->send.assign(nranks, nullptr);
        c->recv.assign(nranks, nullptr);
    }
    if (c->n != nranks) return 4;
    Clique* cl = c;
    cl->joined++;
    if (nranks > MAX_RANKS) MAX_RANKS = nranks;
    NCCL_CV.notify_all();
    // Every rank waits for the others, as ncclCommInitRank does.
    if (!NCCL_CV.wait_for(g, std::chrono::seconds(60), [&] { return cl->joined >= cl->n; }))
        return 5;  // ncclInvalidUsage: a rank never came
    *comm = new Comm{cl, rank};
    return 0;
}
API ncclResult_t ncclCommAbort(void* comm) {
    delete (Comm*)comm;
    return 0;
}
API ncclResult_t ncclCommDestroy(void* comm) { return ncclCommAbort(comm); }
API ncclResult_t ncclGroupStart() { return 0; }
API ncclResult_t ncclGroupEnd() { return 0; }
API ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int type, int op,
                               void* comm, void*) {
    if (type != 8 || op != 0) return 4;  // only ncclFloat64 with ncclSum
    Comm* cm = (Comm*)comm;
    Clique* c = cm->clique;
    std::unique_lock<std::mutex> g(NCCL);
    if (c->arrived > 0 && c->count != count) c->failed = true;
    c->count = count;
    c->send[cm->rank] = (const double*)send;
    c->recv[cm->rank] = (double*)recv;
    unsigned long long my_round = c->round;
    if (++c->arrived == c->n) {
        std::vector<double> sum(count, 0.0);
        for (int r = 0; r < c->n; r++)
            for (size_t i = 0; i < count; i++) sum[i] = r == 0 ? c->send[0][i] : sum[i] + c->send[r][i];
        for (int r = 0; r < c->n; r++) memcpy(c->recv[r], sum.data(), count * sizeof(double));
        c->arrived = 0;
        c->round++;
        ALL_REDUCES++;
        NCCL_CV.notify_all();
    } else if (!NCCL_CV.wait_for(g, std::chrono::seconds(60), [&] { return c->round != my_round; })) {
        return 5;
    }
    return c->failed ? 4 : 0;
}

// What the emulated NCCL did, for the tests: all-reduces completed, the largest communicator.
API unsigned long long amalgam_emu_nccl_all_reduces() {
    std::lock_guard<std::mutex> g(NCCL);
    return ALL_REDUCES;
}
API unsigned long long amalgam_emu_nccl_max_ranks() {
    std::lock_guard<std::mutex> g(NCCL);
    return MAX_RANKS;
}
