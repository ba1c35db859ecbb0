// Runs one feed kernel of trainer/src/cuda/feed.rs on the CPU (see tests/feed_emu.rs).
// Built as: g++ -std=c++17 -O1 -ffp-contract=off -include kernel_emu/shim.h -include rn.h
//           -include kernels.cu harness.cpp
// Usage: harness KERNEL IN OUT n size mode l r y0 y1 x0 x1 m0 m1 m2 s0 s1 s2 blocks threads
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    if (argc != 21) {
        std::fprintf(stderr, "harness: expected 20 arguments, got %d\n", argc - 1);
        return 2;
    }
    const char* kernel = argv[1];
    FILE* f = std::fopen(argv[2], "rb");
    if (!f) return 3;
    std::vector<unsigned char> src;
    int c;
    while ((c = std::fgetc(f)) != EOF) src.push_back((unsigned char)c);
    std::fclose(f);
    int n = std::atoi(argv[4]), size = std::atoi(argv[5]), mode = std::atoi(argv[6]);
    float l = std::strtof(argv[7], nullptr), r = std::strtof(argv[8], nullptr);
    int y0 = std::atoi(argv[9]), y1 = std::atoi(argv[10]);
    int x0 = std::atoi(argv[11]), x1 = std::atoi(argv[12]);
    float m[3], s[3];
    for (int i = 0; i < 3; ++i) {
        m[i] = std::strtof(argv[13 + i], nullptr);
        s[i] = std::strtof(argv[16 + i], nullptr);
    }
    uint3 grid{(unsigned)std::atoi(argv[19]), 1, 1}, block{(unsigned)std::atoi(argv[20]), 1, 1};
    size_t total = (size_t)n * size * size * 3;
    std::vector<unsigned char> out;
    std::string k(kernel);
    if (k == "mix_u8") {
        out.assign(total, 0xAB);
        u8* dst = out.data();
        emu::launch(kernel, grid, block, false, [&] {
            mix_u8(src.data(), dst, n, size, size, mode, l, r, y0, y1, x0, x1);
        });
    } else if (k == "feed_nhwc_bf16") {
        out.assign(total * 2, 0xAB);
        bf16* dst = (bf16*)out.data();
        emu::launch(kernel, grid, block, false, [&] {
            feed_nhwc_bf16(src.data(), dst, n, size, size, mode, l, r, y0, y1, x0, x1, m[0], m[1],
                           m[2], s[0], s[1], s[2]);
        });
    } else if (k == "feed_nchw_f32") {
        out.assign(total * 4, 0xAB);
        float* dst = (float*)out.data();
        emu::launch(kernel, grid, block, false, [&] {
            feed_nchw_f32(src.data(), dst, n, size, size, mode, l, r, y0, y1, x0, x1, m[0], m[1],
                          m[2], s[0], s[1], s[2]);
        });
    } else {
        std::fprintf(stderr, "harness: unknown kernel %s\n", kernel);
        return 2;
    }
    f = std::fopen(argv[3], "wb");
    if (!f) return 3;
    std::fwrite(out.data(), 1, out.size(), f);
    std::fclose(f);
    return 0;
}
