// A CUDA driver on the CPU, for running the real cuda.bindings and cuda.core without a GPU.
//
// Built by the tests as libcuda.so.1 and put first on LD_LIBRARY_PATH: cuda.bindings resolves
// every driver entry point through cuGetProcAddress_v2 of the libcuda.so.1 it loads, so the
// library's own code (its contexts, streams, events, memory resources, StridedMemoryView and
// CUDAError) runs unchanged on top of this one.
//
// What it models, and the rules it enforces rather than trusts:
// - Devices (TRTVIT_MOCK_DEVICES, default 2; CUDA_VISIBLE_DEVICES honoured, "" = none),
//   primary contexts, and the current context of each thread. Which devices ever had a
//   context made current is visible to the tests (trtvit_mock_contexts).
// - Streams are ordered queues. Work runs when something waits for it (a host
//   synchronization, or a stream waiting on an event whose stream is then run), so reading
//   a result before it is complete reads what was there before. Each stream carries a vector
//   clock of what it is ordered after; the legacy stream synchronizes with blocking streams.
// - Events belong to the context current when they were made; recording one on a stream of
//   another context fails with CUDA_ERROR_INVALID_HANDLE, as CUDA does.
// - The stream-ordered pool: a block is usable on the stream it was allocated on, and on
//   streams ordered after that; a freed block is poisoned (0xff bytes: NaN) when its free
//   runs, and is reused by the next allocation of its size on the freeing stream at once.
// - Pinned host memory: copies from it read it when they run, so writing it while a copy is
//   pending is an error; freeing it needs a context.
// Broken rules (a block used on a stream not ordered after its allocation, freed while
// another stream may still use it, used after free, pinned memory rewritten under a pending
// copy) are recorded as violations, which the tests read (trtvit_mock_violations).
//
// Device memory is host memory, so the tests' stand-in for TensorRT (the CPU interpreter)
// reads and writes device buffers directly, queued with trtvit_mock_launch.
#include <cuda.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#define API extern "C" __attribute__((visibility("default")))

namespace {

using VC = std::map<int, uint64_t>;  // stream id -> last sequence number ordered before

struct Ctx;

struct Dep {
    struct Stream* stream;
    uint64_t seq;
};

struct Op {
    uint64_t seq;
    std::vector<Dep> deps;
    std::function<void()> run;
    double cost_ms;
};

struct Stream {
    int id;
    Ctx* ctx;
    unsigned flags;
    bool legacy;
    bool alive = true;
    std::deque<Op> ops;
    uint64_t seq = 0, done = 0;
    VC vc;
};

struct Ctx {
    int device;
    unsigned long long id;
    Stream* legacy;
    int retain = 0;
    unsigned flags = 0;
    std::vector<Stream*> streams;  // blocking and non-blocking streams created in it
};

struct Event {
    Ctx* ctx;
    unsigned flags;
    bool alive = true;
    bool recorded = false;
    Stream* stream = nullptr;
    uint64_t seq = 0;
    VC vc;
    double time = -1;
    uint64_t generation = 0;
};

struct Use {
    int stream;
    uint64_t seq;
    bool write;
};

struct Block {
    uintptr_t base;
    size_t size;
    int device;  // -1: pinned host memory
    bool freed = false;
    bool free_done = false;
    int alloc_stream = 0;
    uint64_t alloc_seq = 0;
    int free_stream = 0;
    uint64_t free_seq = 0;
    std::vector<Use> uses;
    unsigned long long buffer_id;
};

struct Pool {
    int device;
};

std::recursive_mutex mu;
bool initialized = false;
int device_count = 0;
std::vector<int> visible;  // visible ordinal -> mock device index
std::vector<Ctx*> primary;  // per visible ordinal, created on first retain
std::vector<Ctx*> created;  // contexts made with cuCtxCreate (as pycuda.autoinit makes one)
std::vector<int> contexts_created, made_current, legacy_syncs;
std::vector<Pool*> pools;
std::map<int, Stream*> streams;  // every stream ever created, by id
std::set<Event*> events;
std::map<uintptr_t, Block*> blocks;  // device and pinned blocks, live and freed, by base
VC host_vc;
double clock_ms = 0;
int next_stream_id = 1;
unsigned long long next_ctx_id = 1, next_buffer_id = 1;
std::vector<std::string> violations;
int blocking_event_syncs = 0, spinning_event_syncs = 0;
thread_local std::vector<Ctx*> ctx_stack;
thread_local std::map<Ctx*, Stream*> per_thread_streams;  // CU_STREAM_PER_THREAD: one per thread and context
std::map<std::string, CUresult> fail_next;  // injected failures: entry point -> the code its next call returns

std::string hex(uintptr_t v) {
    std::ostringstream s;
    s << "0x" << std::hex << v;
    return s.str();
}

void violation(const std::string& what) { violations.push_back(what); }

std::string stream_name(Stream* s) {
    std::string kind = s->legacy ? "legacy stream" : "stream " + std::to_string(s->id);
    return kind + " of device " + std::to_string(s->ctx->device);
}

std::string stream_name(int id) { return streams.count(id) ? stream_name(streams[id]) : "stream " + std::to_string(id); }

Ctx* current() { return ctx_stack.empty() ? nullptr : ctx_stack.back(); }

void merge(VC& into, const VC& from) {
    for (auto& kv : from)
        if (into[kv.first] < kv.second) into[kv.first] = kv.second;
}

// The dependencies an op enqueued on ``s`` now would have beyond the stream's own order
// (the legacy stream's implicit synchronization with blocking streams).
std::vector<Dep> implicit_deps(Stream* s) {
    std::vector<Dep> deps;
    if (s->legacy) {
        for (Stream* b : s->ctx->streams)
            if (!(b->flags & CU_STREAM_NON_BLOCKING) && b->seq) deps.push_back({b, b->seq});
    } else if (!(s->flags & CU_STREAM_NON_BLOCKING) && s->ctx->legacy->seq) {
        deps.push_back({s->ctx->legacy, s->ctx->legacy->seq});
    }
    return deps;
}

// What an op enqueued on ``s`` now is ordered after.
VC next_position(Stream* s) {
    VC pos = s->vc;
    merge(pos, host_vc);
    pos[s->id] = std::max(pos[s->id], s->seq);
    for (const Dep& d : implicit_deps(s)) {
        merge(pos, d.stream->vc);
        pos[d.stream->id] = std::max(pos[d.stream->id], d.seq);
    }
    return pos;
}

uint64_t enqueue(Stream* s, std::function<void()> run, double cost_ms = 0, std::vector<Dep> deps = {}) {
    for (const Dep& d : implicit_deps(s)) deps.push_back(d);
    s->vc = next_position(s);
    for (const Dep& d : deps) {
        merge(s->vc, d.stream->vc);
        s->vc[d.stream->id] = std::max(s->vc[d.stream->id], d.seq);
    }
    s->seq += 1;
    s->vc[s->id] = s->seq;
    s->ops.push_back({s->seq, std::move(deps), std::move(run), cost_ms});
    return s->seq;
}

void run_until(Stream* s, uint64_t seq) {
    while (s->done < seq && !s->ops.empty()) {
        Op op = std::move(s->ops.front());
        s->ops.pop_front();
        for (const Dep& d : op.deps) run_until(d.stream, d.seq);
        if (op.run) op.run();
        clock_ms += op.cost_ms;
        s->done = op.seq;
    }
}

void host_observes(Stream* s, uint64_t seq, const VC& vc) {
    run_until(s, seq);
    merge(host_vc, vc);
    host_vc[s->id] = std::max(host_vc[s->id], seq);
}

void sync_stream(Stream* s) {
    VC vc = s->vc;
    host_observes(s, s->seq, vc);
}

Stream* new_stream(Ctx* ctx, unsigned flags, bool legacy) {
    Stream* s = new Stream{next_stream_id++, ctx, flags, legacy};
    streams[s->id] = s;
    return s;
}

// The stream a handle names: 0 and CU_STREAM_LEGACY the current context's legacy stream,
// CU_STREAM_PER_THREAD its per-thread stream.
CUresult resolve(CUstream h, Stream** out) {
    uintptr_t v = reinterpret_cast<uintptr_t>(h);
    if (v == 0 || v == 1 || v == 2) {
        Ctx* c = current();
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        if (v != 2) {
            *out = c->legacy;
        } else {
            Stream*& mine = per_thread_streams[c];
            if (!mine) {
                mine = new_stream(c, 0, false);  // blocking: it synchronizes with the legacy stream
                c->streams.push_back(mine);
            }
            *out = mine;
        }
        return CUDA_SUCCESS;
    }
    for (auto& kv : streams)
        if (kv.second == reinterpret_cast<Stream*>(h)) {
            if (!kv.second->alive) {  // undefined in CUDA (the handle may have been reused): flagged
                violation("stream " + std::to_string(kv.first) + " was used after cuStreamDestroy");
                return CUDA_ERROR_INVALID_HANDLE;
            }
            *out = kv.second;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_INVALID_HANDLE;
}

Event* find_event(CUevent e) {
    Event* ev = reinterpret_cast<Event*>(e);
    return events.count(ev) && ev->alive ? ev : nullptr;
}

Block* find_block(uintptr_t p) {
    auto it = blocks.upper_bound(p);
    if (it == blocks.begin()) return nullptr;
    --it;
    Block* b = it->second;
    return p < b->base + std::max<size_t>(b->size, 1) ? b : nullptr;
}

// Check that work queued on ``s`` now may touch ``b`` (``write``: it writes it): the block
// is live, ordered after its allocation, and ordered after every earlier use that conflicts
// (any use, for a write; a write, for a read). A broken rule is a violation, and the work is
// still queued, as on a GPU; the use is recorded once it is queued.
bool check_use(Block* b, Stream* s, const std::string& what, bool write) {
    std::string name = (b->device >= 0 ? "device block " : "pinned host memory ") + hex(b->base) + " (" +
                       std::to_string(b->size) + " bytes)";
    if (b->freed) {
        violation(what + ": " + name + " is used on " + stream_name(s) + " after it was freed");
        return false;
    }
    VC pos = next_position(s);
    if (b->device >= 0 && pos[b->alloc_stream] < b->alloc_seq) {
        violation(what + ": " + name + ", allocated on " + stream_name(b->alloc_stream) + ", is used on " +
                  stream_name(s) + ", which is not ordered after its allocation");
        return false;
    }
    std::vector<Use> kept;
    bool ok = true;
    for (const Use& u : b->uses) {
        if (host_vc[u.stream] >= u.seq) continue;  // complete, and the host has seen it: ordered before all later work
        kept.push_back(u);
        if (ok && (write || u.write) && pos[u.stream] < u.seq) {
            violation(what + ": " + name + " is " + (write ? "written" : "read") + " on " + stream_name(s) +
                      " while work queued on " + stream_name(u.stream) + " " + (u.write ? "writes" : "reads") +
                      " it, and nothing orders the two");
            ok = false;
        }
    }
    b->uses = kept;
    return ok;
}

void ctx_made_current(Ctx* c) {
    if (c) made_current[c->device] += 1;
}

CUresult need_init() { return initialized ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED; }

bool valid(CUdevice dev) { return dev >= 0 && dev < device_count; }

// The failure injected for the next call of ``entry`` (its name without the _v2 suffix), once.
CUresult injected(const char* entry) {
    std::string name(entry);
    for (const char* suffix : {"_v2", "_v3", "_v4", "_ptsz", "_ptds"})
        if (name.size() > std::strlen(suffix) && name.compare(name.size() - std::strlen(suffix), std::string::npos,
                                                              suffix) == 0)
            name.resize(name.size() - std::strlen(suffix));
    auto it = fail_next.find(name);
    if (it == fail_next.end()) return CUDA_SUCCESS;
    CUresult code = it->second;
    fail_next.erase(it);
    return code;
}

#define GUARD()                                        \
    std::lock_guard<std::recursive_mutex> lock(mu);    \
    if (CUresult e_ = need_init(); e_ != CUDA_SUCCESS) \
        return e_;                                     \
    if (CUresult f_ = injected(__func__); f_ != CUDA_SUCCESS) return f_

// Poison: all bits set, a NaN in every float format.
void poison(Block* b) { std::memset(reinterpret_cast<void*>(b->base), 0xff, b->size); }

Block* new_block(size_t size, int device) {
    size_t n = std::max<size_t>(size, 1);
    void* p = std::aligned_alloc(256, (n + 255) / 256 * 256);
    Block* b = new Block{reinterpret_cast<uintptr_t>(p), size, device};
    b->buffer_id = next_buffer_id++;
    std::memset(p, 0xa5, n);  // fresh memory holds garbage, not zeros
    blocks[b->base] = b;
    return b;
}

// What a pointer is: a device block, a pinned block, or pageable host memory (nullptr).
struct Place {
    Block* block;
    bool device;
};

Place place(uintptr_t p) {
    Block* b = find_block(p);
    return {b, b && b->device >= 0};
}

CUresult copy_async(uintptr_t dst, uintptr_t src, size_t n, Stream* s, const char* what) {
    if (!n) return CUDA_SUCCESS;
    Place d = place(dst), r = place(src);
    for (auto [pl, p] : {std::pair<Place, uintptr_t>{d, dst}, {r, src}})
        if (pl.block && p + n > pl.block->base + pl.block->size) return CUDA_ERROR_INVALID_VALUE;
    if (d.block) check_use(d.block, s, what, true);
    if (r.block) check_use(r.block, s, what, false);
    std::shared_ptr<std::vector<char>> staged;
    if (!r.block) {  // pageable source: staged when the call is made
        staged = std::make_shared<std::vector<char>>(reinterpret_cast<char*>(src), reinterpret_cast<char*>(src) + n);
    }
    std::shared_ptr<std::vector<char>> snapshot;
    if (r.block && !r.device) {  // pinned source: read when the copy runs
        snapshot = std::make_shared<std::vector<char>>(reinterpret_cast<char*>(src), reinterpret_cast<char*>(src) + n);
    }
    int sid = s->id;
    uint64_t seq = enqueue(s, [=]() {
        if (snapshot && std::memcmp(snapshot->data(), reinterpret_cast<void*>(src), n) != 0)
            violation(std::string(what) + ": pinned host memory " + hex(src) + " was written while a copy queued on " +
                      stream_name(sid) + " was still to read it");
        std::memmove(reinterpret_cast<void*>(dst), staged ? staged->data() : reinterpret_cast<void*>(src), n);
    }, n * 1e-9);
    if (d.block) d.block->uses.push_back({sid, seq, true});
    if (r.block) r.block->uses.push_back({sid, seq, false});
    if (!d.block) host_observes(s, seq, s->vc);  // pageable destination: the call returns once the copy is done
    return CUDA_SUCCESS;
}

struct ErrorName {
    CUresult code;
    const char* name;
    const char* text;
};

const ErrorName error_names[] = {
    {CUDA_SUCCESS, "CUDA_SUCCESS", "no error"},
    {CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {CUDA_ERROR_NO_DEVICE, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {CUDA_ERROR_INVALID_CONTEXT, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {CUDA_ERROR_INVALID_HANDLE, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {CUDA_ERROR_NOT_FOUND, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {CUDA_ERROR_NOT_READY, "CUDA_ERROR_NOT_READY", "device not ready"},
    {CUDA_ERROR_ILLEGAL_ADDRESS, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {CUDA_ERROR_LAUNCH_FAILED, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Initialization, version, errors
// ---------------------------------------------------------------------------------------

API CUresult cuInit(unsigned int) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    if (initialized) return device_count ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
    const char* n = std::getenv("TRTVIT_MOCK_DEVICES");
    int physical = n ? std::atoi(n) : 2;
    const char* cvd = std::getenv("CUDA_VISIBLE_DEVICES");
    if (cvd) {
        std::stringstream list(cvd);
        std::string item;
        while (std::getline(list, item, ',')) {
            char* end = nullptr;
            long v = std::strtol(item.c_str(), &end, 10);
            if (item.empty() || *end || v < 0 || v >= physical) break;  // CUDA stops at the first invalid entry
            visible.push_back(int(v));
        }
    } else {
        for (int i = 0; i < physical; ++i) visible.push_back(i);
    }
    device_count = int(visible.size());
    primary.assign(device_count, nullptr);
    contexts_created.assign(device_count, 0);
    made_current.assign(device_count, 0);
    legacy_syncs.assign(device_count, 0);
    for (int i = 0; i < device_count; ++i) pools.push_back(new Pool{i});
    initialized = true;
    return device_count ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

API CUresult cuDriverGetVersion(int* version) {
    if (!version) return CUDA_ERROR_INVALID_VALUE;
    const char* v = std::getenv("TRTVIT_MOCK_DRIVER_VERSION");
    *version = v ? std::atoi(v) : 13000;
    return CUDA_SUCCESS;
}

API CUresult cuGetErrorName(CUresult error, const char** name) {
    for (const ErrorName& e : error_names)
        if (e.code == error) {
            *name = e.name;
            return CUDA_SUCCESS;
        }
    *name = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

API CUresult cuGetErrorString(CUresult error, const char** text) {
    for (const ErrorName& e : error_names)
        if (e.code == error) {
            *text = e.text;
            return CUDA_SUCCESS;
        }
    *text = nullptr;
    return CUDA_ERROR_INVALID_VALUE;
}

// ---------------------------------------------------------------------------------------
// Devices
// ---------------------------------------------------------------------------------------

API CUresult cuDeviceGetCount(int* count) {
    GUARD();
    *count = device_count;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGet(CUdevice* device, int ordinal) {
    GUARD();
    if (!valid(ordinal)) return CUDA_ERROR_INVALID_DEVICE;
    *device = ordinal;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetName(char* name, int len, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    std::snprintf(name, len, "CPU-backed CUDA device %d", visible[dev]);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetUuid(CUuuid* uuid, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    std::memset(uuid->bytes, 0, sizeof(uuid->bytes));
    uuid->bytes[0] = char(0x7e);
    uuid->bytes[15] = char(visible[dev]);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceTotalMem(size_t* bytes, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    *bytes = size_t(16) << 30;
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetAttribute(int* value, CUdevice_attribute attr, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    switch (attr) {
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
        case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
        case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 4; break;
        case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
        case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *value = 1024; break;
        case CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING:
        case CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED:
        case CU_DEVICE_ATTRIBUTE_CONCURRENT_KERNELS:
        case CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY:
        case CU_DEVICE_ATTRIBUTE_INTEGRATED: *value = attr == CU_DEVICE_ATTRIBUTE_INTEGRATED ? 0 : 1; break;
        case CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: *value = visible[dev] + 1; break;
        case CU_DEVICE_ATTRIBUTE_MEMPOOL_SUPPORTED_HANDLE_TYPES: *value = 0; break;
        default: *value = 0;
    }
    return CUDA_SUCCESS;
}

API CUresult cuDeviceCanAccessPeer(int* can, CUdevice dev, CUdevice peer) {
    GUARD();
    if (!valid(dev) || !valid(peer)) return CUDA_ERROR_INVALID_DEVICE;
    *can = dev != peer;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------------------

API CUresult cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (!primary[dev]) {
        Ctx* c = new Ctx{dev, next_ctx_id++, nullptr};
        c->legacy = new_stream(c, 0, true);
        primary[dev] = c;
        contexts_created[dev] += 1;
    }
    primary[dev]->retain += 1;
    *ctx = reinterpret_cast<CUcontext>(primary[dev]);
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxRelease(CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (primary[dev] && primary[dev]->retain > 0) primary[dev]->retain -= 1;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxGetState(CUdevice dev, unsigned int* flags, int* active) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    *flags = primary[dev] ? primary[dev]->flags : 0;
    *active = primary[dev] && primary[dev]->retain > 0;
    return CUDA_SUCCESS;
}

API CUresult cuDevicePrimaryCtxSetFlags(CUdevice dev, unsigned int flags) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    if (primary[dev]) primary[dev]->flags = flags;
    return CUDA_SUCCESS;
}

namespace {
Ctx* as_ctx(CUcontext c) {
    for (Ctx* p : primary)
        if (p && reinterpret_cast<CUcontext>(p) == c) return p;
    for (Ctx* p : created)
        if (p->retain > 0 && reinterpret_cast<CUcontext>(p) == c) return p;
    return nullptr;
}
}  // namespace

API CUresult cuCtxCreate(CUcontext* out, CUctxCreateParams*, unsigned int flags, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    Ctx* c = new Ctx{dev, next_ctx_id++, nullptr};
    c->legacy = new_stream(c, 0, true);
    c->retain = 1;
    c->flags = flags;
    created.push_back(c);
    ctx_stack.push_back(c);  // current on the calling thread, supplanting the one that was
    ctx_made_current(c);
    *out = reinterpret_cast<CUcontext>(c);
    return CUDA_SUCCESS;
}

API CUresult cuCtxDestroy(CUcontext ctx) {
    GUARD();
    Ctx* c = as_ctx(ctx);
    if (!c || std::find(created.begin(), created.end(), c) == created.end()) return CUDA_ERROR_INVALID_CONTEXT;
    c->retain = 0;
    if (!ctx_stack.empty() && ctx_stack.back() == c) ctx_stack.pop_back();
    return CUDA_SUCCESS;
}

API CUresult cuCtxSetCurrent(CUcontext ctx) {
    GUARD();
    Ctx* c = nullptr;
    if (ctx) {
        c = as_ctx(ctx);
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    }
    if (!ctx_stack.empty()) ctx_stack.pop_back();
    if (c) {
        ctx_stack.push_back(c);
        ctx_made_current(c);
    }
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetCurrent(CUcontext* ctx) {
    GUARD();
    *ctx = reinterpret_cast<CUcontext>(current());
    return CUDA_SUCCESS;
}

API CUresult cuCtxPushCurrent(CUcontext ctx) {
    GUARD();
    Ctx* c = as_ctx(ctx);
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    ctx_stack.push_back(c);
    ctx_made_current(c);
    return CUDA_SUCCESS;
}

API CUresult cuCtxPopCurrent(CUcontext* ctx) {
    GUARD();
    if (ctx_stack.empty()) return CUDA_ERROR_INVALID_CONTEXT;
    if (ctx) *ctx = reinterpret_cast<CUcontext>(ctx_stack.back());
    ctx_stack.pop_back();
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetDevice(CUdevice* dev) {
    GUARD();
    if (!current()) return CUDA_ERROR_INVALID_CONTEXT;
    *dev = current()->device;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetId(CUcontext ctx, unsigned long long* id) {
    GUARD();
    Ctx* c = ctx ? as_ctx(ctx) : current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    *id = c->id;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetFlags(unsigned int* flags) {
    GUARD();
    if (!current()) return CUDA_ERROR_INVALID_CONTEXT;
    *flags = current()->flags;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetApiVersion(CUcontext ctx, unsigned int* version) {
    GUARD();
    *version = 13000;
    return CUDA_SUCCESS;
}

API CUresult cuCtxSynchronize() {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    sync_stream(c->legacy);
    for (Stream* s : c->streams) sync_stream(s);
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Streams
// ---------------------------------------------------------------------------------------

API CUresult cuStreamCreateWithPriority(CUstream* out, unsigned int flags, int) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Stream* s = new_stream(c, flags, false);
    c->streams.push_back(s);
    *out = reinterpret_cast<CUstream>(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamCreate(CUstream* out, unsigned int flags) { return cuStreamCreateWithPriority(out, flags, 0); }

API CUresult cuStreamDestroy(CUstream h) {
    GUARD();
    uintptr_t v = reinterpret_cast<uintptr_t>(h);
    if (v <= 2) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    s->alive = false;  // queued work still runs when something waits for it
    return CUDA_SUCCESS;
}

API CUresult cuStreamSynchronize(CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    if (s->legacy) legacy_syncs[s->ctx->device] += 1;
    sync_stream(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamQuery(CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    if (s->done < s->seq) {  // the work runs now, and the host learns of it at the next query
        run_until(s, s->seq);
        return CUDA_ERROR_NOT_READY;
    }
    sync_stream(s);
    return CUDA_SUCCESS;
}

API CUresult cuStreamWaitEvent(CUstream h, CUevent e, unsigned int) {
    GUARD();
    Stream* s;
    if (CUresult r = resolve(h, &s); r != CUDA_SUCCESS) return r;
    Event* ev = find_event(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    if (!ev->recorded) return CUDA_SUCCESS;
    VC covered = ev->vc;
    Stream* producer = ev->stream;
    uint64_t seq = ev->seq;
    enqueue(s, nullptr, 0, {{producer, seq}});
    merge(s->vc, covered);
    return CUDA_SUCCESS;
}

API CUresult cuStreamGetCtx(CUstream h, CUcontext* ctx) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *ctx = reinterpret_cast<CUcontext>(s->ctx);
    return CUDA_SUCCESS;
}

API CUresult cuStreamGetCtx_v2(CUstream h, CUcontext* ctx, CUgreenCtx* green) {
    if (green) *green = nullptr;
    return cuStreamGetCtx(h, ctx);
}

API CUresult cuStreamGetDevice(CUstream h, CUdevice* dev) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *dev = s->ctx->device;
    return CUDA_SUCCESS;
}

API CUresult cuStreamGetFlags(CUstream h, unsigned int* flags) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *flags = s->flags;
    return CUDA_SUCCESS;
}

API CUresult cuStreamGetPriority(CUstream h, int* priority) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *priority = 0;
    return CUDA_SUCCESS;
}

API CUresult cuStreamGetId(CUstream h, unsigned long long* id) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *id = s->id;
    return CUDA_SUCCESS;
}

API CUresult cuCtxGetStreamPriorityRange(int* least, int* greatest) {
    GUARD();
    if (least) *least = 0;
    if (greatest) *greatest = -5;
    return CUDA_SUCCESS;
}

API CUresult cuStreamIsCapturing(CUstream h, CUstreamCaptureStatus* status) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    *status = CU_STREAM_CAPTURE_STATUS_NONE;
    return CUDA_SUCCESS;
}

API CUresult cuLaunchHostFunc(CUstream h, CUhostFn fn, void* data) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    enqueue(s, [=]() { fn(data); });
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------

API CUresult cuEventCreate(CUevent* out, unsigned int flags) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Event* e = new Event{c, flags};
    events.insert(e);
    *out = reinterpret_cast<CUevent>(e);
    return CUDA_SUCCESS;
}

API CUresult cuEventDestroy(CUevent e) {
    GUARD();
    Event* ev = find_event(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    ev->alive = false;
    return CUDA_SUCCESS;
}

API CUresult cuEventRecord(CUevent e, CUstream h) {
    GUARD();
    Event* ev = find_event(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    Stream* s;
    if (CUresult r = resolve(h, &s); r != CUDA_SUCCESS) return r;
    if (s->ctx != ev->ctx) return CUDA_ERROR_INVALID_HANDLE;  // an event and a stream of different contexts
    uint64_t generation = ++ev->generation;
    ev->time = -1;
    ev->seq = enqueue(s, [ev, generation]() {
        if (ev->generation == generation) ev->time = clock_ms;
    });
    ev->stream = s;
    ev->vc = s->vc;
    ev->recorded = true;
    return CUDA_SUCCESS;
}

API CUresult cuEventRecordWithFlags(CUevent e, CUstream h, unsigned int) { return cuEventRecord(e, h); }

API CUresult cuEventSynchronize(CUevent e) {
    GUARD();
    Event* ev = find_event(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    (ev->flags & CU_EVENT_BLOCKING_SYNC ? blocking_event_syncs : spinning_event_syncs) += 1;
    if (ev->recorded) host_observes(ev->stream, ev->seq, ev->vc);
    return CUDA_SUCCESS;
}

API CUresult cuEventQuery(CUevent e) {
    GUARD();
    Event* ev = find_event(e);
    if (!ev) return CUDA_ERROR_INVALID_HANDLE;
    if (!ev->recorded) return CUDA_SUCCESS;
    if (ev->stream->done < ev->seq) {  // the work runs now, and the host learns of it at the next query
        run_until(ev->stream, ev->seq);
        return CUDA_ERROR_NOT_READY;
    }
    host_observes(ev->stream, ev->seq, ev->vc);
    return CUDA_SUCCESS;
}

API CUresult cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    GUARD();
    Event *a = find_event(start), *b = find_event(end);
    if (!a || !b) return CUDA_ERROR_INVALID_HANDLE;
    if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
    if (a->time < 0 || b->time < 0) return CUDA_ERROR_NOT_READY;
    *ms = float(b->time - a->time);
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Memory: the stream-ordered pool, pinned host memory, copies, pointer attributes
// ---------------------------------------------------------------------------------------

API CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice dev) {
    GUARD();
    if (!valid(dev)) return CUDA_ERROR_INVALID_DEVICE;
    *pool = reinterpret_cast<CUmemoryPool>(pools[dev]);
    return CUDA_SUCCESS;
}

API CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice dev) { return cuDeviceGetDefaultMemPool(pool, dev); }

API CUresult cuMemPoolGetAttribute(CUmemoryPool, CUmemPool_attribute, void* value) {
    GUARD();
    std::memset(value, 0, sizeof(cuuint64_t));
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolSetAttribute(CUmemoryPool, CUmemPool_attribute, void*) {
    GUARD();
    return CUDA_SUCCESS;
}

API CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) {
    GUARD();
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocFromPoolAsync(CUdeviceptr* out, size_t size, CUmemoryPool pool, CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    int device = reinterpret_cast<Pool*>(pool)->device;
    Block* b = nullptr;
    for (auto& kv : blocks) {  // reuse: freed on this stream (in order), or its free has run
        Block* c = kv.second;
        if (c->freed && c->device == device && c->size == size && (c->free_stream == s->id || c->free_done)) {
            b = c;
            break;
        }
    }
    if (!b) b = new_block(size, device);
    b->freed = b->free_done = false;
    b->uses.clear();
    b->alloc_stream = s->id;
    b->alloc_seq = enqueue(s, nullptr);
    *out = b->base;
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocAsync(CUdeviceptr* out, size_t size, CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    return cuMemAllocFromPoolAsync(out, size, reinterpret_cast<CUmemoryPool>(pools[s->ctx->device]), h);
}

API CUresult cuMemFreeAsync(CUdeviceptr ptr, CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    auto it = blocks.find(ptr);
    if (it == blocks.end() || it->second->device < 0 || it->second->freed) return CUDA_ERROR_INVALID_VALUE;
    Block* b = it->second;
    VC pos = next_position(s);
    for (const Use& u : b->uses)
        if (host_vc[u.stream] < u.seq && pos[u.stream] < u.seq) {
            violation("device block " + hex(b->base) + " (" + std::to_string(b->size) + " bytes) is freed on " +
                      stream_name(s) + " while work queued on " + stream_name(u.stream) +
                      " may still use it (nothing orders that work before the free)");
            break;
        }
    b->freed = true;
    b->free_stream = s->id;
    b->free_seq = enqueue(s, [b]() {
        poison(b);
        b->free_done = true;
    });
    return CUDA_SUCCESS;
}

API CUresult cuMemAlloc(CUdeviceptr* out, size_t size) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Block* b = new_block(size, c->device);
    b->alloc_stream = c->legacy->id;
    b->alloc_seq = 0;
    *out = b->base;
    return CUDA_SUCCESS;
}

API CUresult cuMemFree(CUdeviceptr ptr) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    auto it = blocks.find(ptr);
    if (it == blocks.end() || it->second->device < 0 || it->second->freed) return CUDA_ERROR_INVALID_VALUE;
    cuCtxSynchronize();
    it->second->freed = it->second->free_done = true;
    poison(it->second);
    return CUDA_SUCCESS;
}

API CUresult cuMemHostAlloc(void** out, size_t size, unsigned int) {
    GUARD();
    if (!current()) return CUDA_ERROR_INVALID_CONTEXT;
    Block* b = new_block(size, -1);
    *out = reinterpret_cast<void*>(b->base);
    return CUDA_SUCCESS;
}

API CUresult cuMemAllocHost(void** out, size_t size) { return cuMemHostAlloc(out, size, 0); }

API CUresult cuMemFreeHost(void* p) {
    GUARD();
    if (!current()) return CUDA_ERROR_INVALID_CONTEXT;
    auto it = blocks.find(reinterpret_cast<uintptr_t>(p));
    if (it == blocks.end() || it->second->device >= 0 || it->second->freed) return CUDA_ERROR_INVALID_VALUE;
    Block* b = it->second;
    for (const Use& u : b->uses)
        if (host_vc[u.stream] < u.seq) {
            violation("pinned host memory " + hex(b->base) + " is freed while a copy queued on " +
                      stream_name(u.stream) + " may still use it");
            break;
        }
    b->freed = b->free_done = true;
    poison(b);
    return CUDA_SUCCESS;
}

API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    return copy_async(dst, src, n, s, "cuMemcpyAsync");
}

API CUresult cuMemcpyHtoDAsync(CUdeviceptr dst, const void* src, size_t n, CUstream h) {
    return cuMemcpyAsync(dst, reinterpret_cast<CUdeviceptr>(src), n, h);
}

API CUresult cuMemcpyDtoHAsync(void* dst, CUdeviceptr src, size_t n, CUstream h) {
    return cuMemcpyAsync(reinterpret_cast<CUdeviceptr>(dst), src, n, h);
}

API CUresult cuMemcpyDtoDAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream h) {
    return cuMemcpyAsync(dst, src, n, h);
}

API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    if (CUresult e = copy_async(dst, src, n, c->legacy, "cuMemcpy"); e != CUDA_SUCCESS) return e;
    sync_stream(c->legacy);
    return CUDA_SUCCESS;
}

API CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char value, size_t n, CUstream h) {
    GUARD();
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    Block* b = find_block(dst);
    if (!b || b->device < 0 || dst + n > b->base + b->size) return CUDA_ERROR_INVALID_VALUE;
    check_use(b, s, "cuMemsetD8Async", true);
    b->uses.push_back({s->id, enqueue(s, [=]() { std::memset(reinterpret_cast<void*>(dst), value, n); }), true});
    return CUDA_SUCCESS;
}

API CUresult cuMemGetInfo(size_t* free_bytes, size_t* total) {
    GUARD();
    if (!current()) return CUDA_ERROR_INVALID_CONTEXT;
    *total = size_t(16) << 30;
    *free_bytes = *total / 2;
    return CUDA_SUCCESS;
}

namespace {
CUresult pointer_attribute(void* data, CUpointer_attribute attr, CUdeviceptr ptr, bool many) {
    Block* b = find_block(ptr);
    if (b && b->freed) b = nullptr;
    if (!b) {
        if (!many) return CUDA_ERROR_INVALID_VALUE;
        switch (attr) {  // cuPointerGetAttributes on memory CUDA does not know: zeros
            case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: *static_cast<int*>(data) = -2; break;
            case CU_POINTER_ATTRIBUTE_CONTEXT:
            case CU_POINTER_ATTRIBUTE_DEVICE_POINTER:
            case CU_POINTER_ATTRIBUTE_HOST_POINTER:
            case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE:
            case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR:
            case CU_POINTER_ATTRIBUTE_RANGE_SIZE:
            case CU_POINTER_ATTRIBUTE_BUFFER_ID: *static_cast<unsigned long long*>(data) = 0; break;
            default: *static_cast<unsigned int*>(data) = 0;
        }
        return CUDA_SUCCESS;
    }
    bool device = b->device >= 0;
    switch (attr) {
        case CU_POINTER_ATTRIBUTE_CONTEXT:
            *static_cast<CUcontext*>(data) = device && primary[b->device] ? reinterpret_cast<CUcontext>(primary[b->device])
                                                                          : nullptr;
            break;
        case CU_POINTER_ATTRIBUTE_MEMORY_TYPE:
            *static_cast<unsigned int*>(data) = device ? CU_MEMORYTYPE_DEVICE : CU_MEMORYTYPE_HOST;
            break;
        case CU_POINTER_ATTRIBUTE_DEVICE_POINTER: *static_cast<CUdeviceptr*>(data) = ptr; break;
        case CU_POINTER_ATTRIBUTE_HOST_POINTER:
            if (device) return CUDA_ERROR_INVALID_VALUE;
            *static_cast<void**>(data) = reinterpret_cast<void*>(ptr);
            break;
        case CU_POINTER_ATTRIBUTE_IS_MANAGED: *static_cast<unsigned int*>(data) = 0; break;
        case CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: {
            int ordinal = b->device;
            if (!device) {  // pinned memory: the device of the context it was allocated in
                Ctx* c = current();
                ordinal = c ? c->device : 0;
            }
            *static_cast<int*>(data) = ordinal;
            break;
        }
        case CU_POINTER_ATTRIBUTE_BUFFER_ID: *static_cast<unsigned long long*>(data) = b->buffer_id; break;
        case CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: *static_cast<CUdeviceptr*>(data) = b->base; break;
        case CU_POINTER_ATTRIBUTE_RANGE_SIZE: *static_cast<size_t*>(data) = b->size; break;
        case CU_POINTER_ATTRIBUTE_MAPPED: *static_cast<unsigned int*>(data) = 1; break;
        case CU_POINTER_ATTRIBUTE_MEMPOOL_HANDLE:
            *static_cast<CUmemoryPool*>(data) = device ? reinterpret_cast<CUmemoryPool>(pools[b->device]) : nullptr;
            break;
        default: *static_cast<unsigned int*>(data) = 0;
    }
    return CUDA_SUCCESS;
}
}  // namespace

API CUresult cuPointerGetAttribute(void* data, CUpointer_attribute attr, CUdeviceptr ptr) {
    GUARD();
    return pointer_attribute(data, attr, ptr, false);
}

API CUresult cuPointerGetAttributes(unsigned int n, CUpointer_attribute* attrs, void** data, CUdeviceptr ptr) {
    GUARD();
    for (unsigned int i = 0; i < n; ++i)
        if (CUresult e = pointer_attribute(data[i], attrs[i], ptr, true); e != CUDA_SUCCESS) return e;
    return CUDA_SUCCESS;
}

// ---------------------------------------------------------------------------------------
// Entry points by name, as cuda.bindings asks for them
// ---------------------------------------------------------------------------------------

namespace {
struct Entry {
    const char* name;
    void* fn;
};
#define E(name, fn) {name, reinterpret_cast<void*>(&fn)}
const Entry entries[] = {
    E("cuInit", cuInit), E("cuDriverGetVersion", cuDriverGetVersion), E("cuGetErrorName", cuGetErrorName),
    E("cuGetErrorString", cuGetErrorString), E("cuDeviceGetCount", cuDeviceGetCount), E("cuDeviceGet", cuDeviceGet),
    E("cuDeviceGetName", cuDeviceGetName), E("cuDeviceGetUuid", cuDeviceGetUuid_v2),
    E("cuDeviceTotalMem", cuDeviceTotalMem_v2), E("cuDeviceGetAttribute", cuDeviceGetAttribute),
    E("cuDeviceCanAccessPeer", cuDeviceCanAccessPeer), E("cuDevicePrimaryCtxRetain", cuDevicePrimaryCtxRetain),
    E("cuDevicePrimaryCtxRelease", cuDevicePrimaryCtxRelease_v2),
    E("cuDevicePrimaryCtxGetState", cuDevicePrimaryCtxGetState),
    E("cuDevicePrimaryCtxSetFlags", cuDevicePrimaryCtxSetFlags_v2), E("cuCtxSetCurrent", cuCtxSetCurrent),
    E("cuCtxGetCurrent", cuCtxGetCurrent), E("cuCtxPushCurrent", cuCtxPushCurrent_v2),
    E("cuCtxPopCurrent", cuCtxPopCurrent_v2), E("cuCtxGetDevice", cuCtxGetDevice), E("cuCtxGetId", cuCtxGetId),
    E("cuCtxGetFlags", cuCtxGetFlags), E("cuCtxCreate", cuCtxCreate_v4), E("cuCtxDestroy", cuCtxDestroy_v2), E("cuCtxGetApiVersion", cuCtxGetApiVersion),
    E("cuCtxSynchronize", cuCtxSynchronize), E("cuCtxGetStreamPriorityRange", cuCtxGetStreamPriorityRange),
    E("cuStreamCreate", cuStreamCreate), E("cuStreamCreateWithPriority", cuStreamCreateWithPriority),
    E("cuStreamDestroy", cuStreamDestroy_v2), E("cuStreamSynchronize", cuStreamSynchronize),
    E("cuStreamQuery", cuStreamQuery), E("cuStreamWaitEvent", cuStreamWaitEvent), E("cuStreamGetCtx", cuStreamGetCtx),
    E("cuStreamGetCtx_v2", cuStreamGetCtx_v2), E("cuStreamGetDevice", cuStreamGetDevice),
    E("cuStreamGetFlags", cuStreamGetFlags), E("cuStreamGetPriority", cuStreamGetPriority),
    E("cuStreamGetId", cuStreamGetId), E("cuStreamIsCapturing", cuStreamIsCapturing),
    E("cuLaunchHostFunc", cuLaunchHostFunc), E("cuEventCreate", cuEventCreate),
    E("cuEventDestroy", cuEventDestroy_v2), E("cuEventRecord", cuEventRecord),
    E("cuEventRecordWithFlags", cuEventRecordWithFlags), E("cuEventSynchronize", cuEventSynchronize),
    E("cuEventQuery", cuEventQuery), E("cuEventElapsedTime", cuEventElapsedTime_v2),
    E("cuDeviceGetDefaultMemPool", cuDeviceGetDefaultMemPool), E("cuDeviceGetMemPool", cuDeviceGetMemPool),
    E("cuMemPoolGetAttribute", cuMemPoolGetAttribute), E("cuMemPoolSetAttribute", cuMemPoolSetAttribute),
    E("cuMemPoolTrimTo", cuMemPoolTrimTo), E("cuMemAllocFromPoolAsync", cuMemAllocFromPoolAsync),
    E("cuMemAllocAsync", cuMemAllocAsync), E("cuMemFreeAsync", cuMemFreeAsync), E("cuMemAlloc", cuMemAlloc_v2),
    E("cuMemFree", cuMemFree_v2), E("cuMemHostAlloc", cuMemHostAlloc), E("cuMemAllocHost", cuMemAllocHost_v2),
    E("cuMemFreeHost", cuMemFreeHost), E("cuMemcpyAsync", cuMemcpyAsync),
    E("cuMemcpyHtoDAsync", cuMemcpyHtoDAsync_v2), E("cuMemcpyDtoHAsync", cuMemcpyDtoHAsync_v2),
    E("cuMemcpyDtoDAsync", cuMemcpyDtoDAsync_v2), E("cuMemcpy", cuMemcpy), E("cuMemsetD8Async", cuMemsetD8Async),
    E("cuMemGetInfo", cuMemGetInfo_v2), E("cuPointerGetAttribute", cuPointerGetAttribute),
    E("cuPointerGetAttributes", cuPointerGetAttributes),
};
#undef E
std::set<std::string> asked_for;  // names asked for and not implemented (trtvit_mock_missing)
}  // namespace

API CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int, cuuint64_t,
                                 CUdriverProcAddressQueryResult* status) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    for (const Entry& e : entries)
        if (std::strcmp(e.name, symbol) == 0) {
            *pfn = e.fn;
            if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
            return CUDA_SUCCESS;
        }
    if (std::strcmp(symbol, "cuGetProcAddress") == 0) {
        *pfn = reinterpret_cast<void*>(&cuGetProcAddress_v2);
        if (status) *status = CU_GET_PROC_ADDRESS_SUCCESS;
        return CUDA_SUCCESS;
    }
    asked_for.insert(symbol);
    *pfn = nullptr;
    if (status) *status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
    return CUDA_ERROR_NOT_FOUND;
}

// ---------------------------------------------------------------------------------------
// Controls for the tests (trtvit_mock_*)
// ---------------------------------------------------------------------------------------

// Queue ``fn(data)`` on ``h`` as a kernel launch would be: in the current context, on one of
// its streams, touching only memory of its device (or pinned memory), each block ordered
// after its allocation and after the conflicting work of other streams. ``reads`` and
// ``writes`` are the pointers the work reads and writes; ``cost_ms`` advances the clock that
// events read.
API CUresult trtvit_mock_launch(CUstream h, void (*fn)(void*), void* data, const CUdeviceptr* reads, int nreads,
                                const CUdeviceptr* writes, int nwrites, double cost_ms) {
    GUARD();
    Ctx* c = current();
    if (!c) return CUDA_ERROR_INVALID_CONTEXT;
    Stream* s;
    if (CUresult e = resolve(h, &s); e != CUDA_SUCCESS) return e;
    if (s->ctx != c) return CUDA_ERROR_INVALID_HANDLE;
    std::vector<std::pair<Block*, bool>> used;
    for (int i = 0; i < nreads + nwrites; ++i) {
        bool write = i >= nreads;
        Block* b = find_block(write ? writes[i - nreads] : reads[i]);
        if (!b || (b->device >= 0 && b->device != c->device)) return CUDA_ERROR_ILLEGAL_ADDRESS;
        check_use(b, s, "launch", write);
        used.push_back({b, write});
    }
    uint64_t seq = enqueue(s, [=]() { fn(data); }, cost_ms);
    for (auto& [b, write] : used) b->uses.push_back({s->id, seq, write});
    return CUDA_SUCCESS;
}

// The violations recorded since the last call, one per line (the buffer is owned here);
// reading them clears them.
API const char* trtvit_mock_violations() {
    std::lock_guard<std::recursive_mutex> lock(mu);
    static std::string text;
    text.clear();
    for (const std::string& v : violations) text += v + "\n";
    violations.clear();
    return text.c_str();
}

// Make the next call of ``entry`` (e.g. "cuMemcpyAsync") return ``code``.
API void trtvit_mock_fail_next(const char* entry, int code) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    fail_next[entry] = CUresult(code);
}

// Entry points asked for and not implemented, one per line.
API const char* trtvit_mock_missing() {
    std::lock_guard<std::recursive_mutex> lock(mu);
    static std::string text;
    text.clear();
    for (const std::string& v : asked_for) text += v + "\n";
    return text.c_str();
}

// How many times a context of device ``dev`` was made current (on any thread), and whether
// its primary context exists.
API int trtvit_mock_contexts_made_current(int dev) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    return dev >= 0 && dev < int(made_current.size()) ? made_current[dev] : -1;
}

API int trtvit_mock_contexts_created(int dev) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    return dev >= 0 && dev < int(contexts_created.size()) ? contexts_created[dev] : -1;
}

API int trtvit_mock_legacy_syncs(int dev) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    return dev >= 0 && dev < int(legacy_syncs.size()) ? legacy_syncs[dev] : -1;
}

// Event synchronizations: blocking (CU_EVENT_BLOCKING_SYNC) when ``blocking``, else spinning.
API int trtvit_mock_event_syncs(int blocking) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    return blocking ? blocking_event_syncs : spinning_event_syncs;
}

// Live (not freed) blocks: pinned host memory when ``dev`` is -1, else device memory of ``dev``.
API int trtvit_mock_live_blocks(int dev) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    int n = 0;
    for (auto& kv : blocks)
        if (!kv.second->freed && kv.second->device == dev) n += 1;
    return n;
}

// Whether ``ptr`` lies in a live device block (1), pinned memory (2), or neither (0).
API int trtvit_mock_pointer_kind(CUdeviceptr ptr) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    Block* b = find_block(ptr);
    if (!b || b->freed) return 0;
    return b->device >= 0 ? 1 : 2;
}

// Operations queued on ``h`` (resolved in the current context) and not yet run.
API int trtvit_mock_pending(CUstream h) {
    std::lock_guard<std::recursive_mutex> lock(mu);
    Stream* s;
    if (resolve(h, &s) != CUDA_SUCCESS) return -1;
    return int(s->ops.size());
}

API double trtvit_mock_clock_ms() {
    std::lock_guard<std::recursive_mutex> lock(mu);
    return clock_ms;
}
