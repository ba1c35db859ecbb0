// Runs a launch script against the CUDA C kernels compiled for the CPU (shim.h).
//
// Built by ../kernel_emu.rs with `kernels.cu` (PRELUDE + the kernel modules) and `kernels.inc`
// (one `K(name, uses_syncthreads)` per kernel) in its include path. Usage: `harness SCRIPT`,
// run in the directory of the data files. Script lines:
//   load NAME FILE        a buffer with the bytes of FILE
//   alloc NAME BYTES      an uninitialised buffer (filled with 0xff bytes: bf16/f32 NaN)
//   launch KERNEL GX GY GZ BX BY BZ ARG...
//                         ARG: p:NAME or p:NAME+BYTES (device pointer), i:INT (int),
//                         l:INT (long long), f:BITS (float, its u32 bits)
//   save NAME FILE        the bytes of a buffer
// Each buffer ends at a page boundary followed by an inaccessible page, so a kernel reading or
// writing past the end of a buffer faults (reported with the buffer's name).
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "shim.h"
#include "kernels.cu"

namespace {

struct Buffer {
    char* ptr;
    size_t bytes;
};
std::map<std::string, Buffer> buffers;

[[noreturn]] void die(const std::string& msg) {
    std::fprintf(stderr, "harness: %s\n", msg.c_str());
    std::exit(2);
}

char* guarded_alloc(size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE);
    size_t body = (bytes + page - 1) / page * page;
    if (body == 0) body = page;
    char* base = (char*)mmap(nullptr, body + page, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) die("mmap failed");
    if (mprotect(base + body, page, PROT_NONE) != 0) die("mprotect failed");
    // The end of the buffer at the guard page, the start 4-byte aligned; 16-byte aligned when
    // the length is a multiple of 16 (the vectorised kernels' 16-byte accesses need it, and the
    // end still meets the guard page).
    size_t align = bytes % 16 == 0 ? 16 : 4;
    size_t start = (body - bytes) & ~(align - 1);
    return base + start;
}

void on_segv(int, siginfo_t* info, void*) {
    char* a = (char*)info->si_addr;
    std::fprintf(stderr, "harness: kernel %s: invalid access at %p", emu::kernel_name, a);
    for (auto& [name, b] : buffers) {
        if (a >= b.ptr && a < b.ptr + b.bytes + 4096)
            std::fprintf(stderr, " (%zu bytes past the end of buffer %s)",
                         (size_t)(a - b.ptr) - b.bytes, name.c_str());
    }
    std::fprintf(stderr, "\n");
    _exit(3);
}

struct Arg {
    char kind;
    uint64_t bits;
};

template <class T>
T get(const Arg& a, const std::string& kernel, size_t i) {
    auto want = [&](char k) {
        if (a.kind != k)
            die(kernel + ": argument " + std::to_string(i) + " is '" + a.kind +
                "', the kernel takes '" + k + "'");
    };
    if constexpr (std::is_pointer_v<T>) {
        want('p');
        return reinterpret_cast<T>((uintptr_t)a.bits);
    } else if constexpr (std::is_floating_point_v<T>) {
        static_assert(sizeof(T) == 4, "double kernel arguments are not supported");
        want('f');
        return __uint_as_float((unsigned int)a.bits);
    } else if constexpr (sizeof(T) == 4) {
        want('i');
        return (T)(int32_t)(uint32_t)a.bits;
    } else {
        static_assert(sizeof(T) == 8, "unsupported kernel argument type");
        want('l');
        return (T)(int64_t)a.bits;
    }
}

template <class... P, size_t... I>
void call_impl(void (*f)(P...), const std::string& name, bool syncs, const std::vector<Arg>& a,
               uint3 g, uint3 b, std::index_sequence<I...>) {
    std::tuple<P...> args{get<P>(a[I], name, I)...};
    emu::launch(name.c_str(), g, b, syncs, [&] { std::apply(f, args); });
}

template <class... P>
void call(void (*f)(P...), const std::string& name, bool syncs, const std::vector<Arg>& a,
          uint3 g, uint3 b) {
    if (a.size() != sizeof...(P))
        die(name + ": " + std::to_string(a.size()) + " arguments, the kernel takes " +
            std::to_string(sizeof...(P)));
    call_impl(f, name, syncs, a, g, b, std::index_sequence_for<P...>{});
}

void dispatch(const std::string& name, const std::vector<Arg>& a, uint3 g, uint3 b) {
#define K(kernel, syncs)                          \
    if (name == #kernel) {                        \
        call(&kernel, name, syncs != 0, a, g, b); \
        return;                                   \
    }
#include "kernels.inc"
#undef K
    die("unknown kernel " + name);
}

Arg parse_arg(const std::string& tok) {
    if (tok.size() < 3 || tok[1] != ':') die("bad argument " + tok);
    std::string v = tok.substr(2);
    switch (tok[0]) {
        case 'p': {
            size_t plus = v.find('+');
            std::string name = v.substr(0, plus);
            size_t off = plus == std::string::npos ? 0 : std::stoull(v.substr(plus + 1));
            auto it = buffers.find(name);
            if (it == buffers.end()) die("no buffer " + name);
            if (off > it->second.bytes) die("offset past the end of " + name);
            return {'p', (uint64_t)(uintptr_t)(it->second.ptr + off)};
        }
        case 'i':
        case 'l':
            return {tok[0], (uint64_t)std::stoll(v)};
        case 'f':
            return {'f', (uint64_t)std::stoul(v)};
        default:
            die("bad argument " + tok);
    }
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) die("usage: harness SCRIPT");
    struct sigaction sa {};
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    std::ifstream script(argv[1]);
    if (!script) die(std::string("cannot read ") + argv[1]);
    std::string line;
    while (std::getline(script, line)) {
        std::istringstream in(line);
        std::string op;
        if (!(in >> op)) continue;
        if (op == "load" || op == "save") {
            std::string name, file;
            in >> name >> file;
            if (op == "load") {
                std::ifstream f(file, std::ios::binary);
                if (!f) die("cannot read " + file);
                std::string data((std::istreambuf_iterator<char>(f)), {});
                char* p = guarded_alloc(data.size());
                std::memcpy(p, data.data(), data.size());
                buffers[name] = {p, data.size()};
            } else {
                auto it = buffers.find(name);
                if (it == buffers.end()) die("no buffer " + name);
                std::ofstream f(file, std::ios::binary);
                f.write(it->second.ptr, (std::streamsize)it->second.bytes);
                if (!f) die("cannot write " + file);
            }
        } else if (op == "alloc") {
            std::string name;
            size_t bytes;
            in >> name >> bytes;
            char* p = guarded_alloc(bytes);
            std::memset(p, 0xff, bytes);
            buffers[name] = {p, bytes};
        } else if (op == "launch") {
            std::string name;
            uint3 g, b;
            in >> name >> g.x >> g.y >> g.z >> b.x >> b.y >> b.z;
            std::vector<Arg> args;
            std::string tok;
            while (in >> tok) args.push_back(parse_arg(tok));
            dispatch(name, args, g, b);
        } else {
            die("bad script line: " + line);
        }
    }
    return 0;
}
