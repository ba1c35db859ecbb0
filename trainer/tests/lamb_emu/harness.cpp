// Runs the LAMB kernels of trainer/src/cuda/lamb.rs on the CPU (see shim.h) over the case of
// trainer/tests/cuda_lamb.rs, with the host side of `CudaLamb::step` mirrored here, and writes
// the inputs and every step's results for trainer/tests/lamb_emu.rs to compare with the CPU
// `Lamb`. Usage: harness CONFIG (0: defaults, 1: trust_clip + always_adapt, 2: no clipping, no
// bias correction, no grad averaging, other betas and eps), in the output directory.
#include <cstdio>
#include <cstdlib>
#include <string>

#include "shim.h"
#include "kernels.cu"  // PRELUDE + lamb.rs's MODULE source, written by ../lamb_emu.rs

static uint64_t rng_state;
// splitmix64 to a float in [-1, 1), as `uniform` in cuda_lamb.rs.
static float uniform() {
    rng_state += 0x9e3779b97f4a7c15ull;
    uint64_t z = rng_state;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((float)(z >> 40) / 16777216.0f) * 2.0f - 1.0f;
}

static void write(const std::string& path, const void* data, size_t bytes) {
    FILE* f = std::fopen(path.c_str(), "wb");
    if (!f || std::fwrite(data, 1, bytes, f) != bytes) { std::perror(path.c_str()); std::exit(1); }
    std::fclose(f);
}

int main(int argc, char** argv) {
    int cfg = argc > 1 ? std::atoi(argv[1]) : 0;
    double wd0 = cfg == 0 ? 0.05 : cfg == 1 ? 0.02 : 0.0;
    double beta1 = 0.9, beta2 = 0.999, eps_d = 1e-6;
    int bias_correction = 1, grad_averaging = 1, has_max = 1, always_adapt = 0, trust_clip = 0;
    if (cfg == 1) { trust_clip = 1; always_adapt = 1; }
    if (cfg == 2) { has_max = 0; bias_correction = 0; grad_averaging = 0; beta1 = 0.8; beta2 = 0.99; eps_d = 1e-8; }

    // Flat order = group order: group 0 (weight decay wd0), then group 1 (none).
    const int n = 7;
    const size_t numel[n] = {32 * 16 * 9, 100 * 400, 16384, 35, 32, 32, 100};
    const int seed_index[n] = {0, 3, 5, 6, 1, 2, 4};  // index in cuda_lamb.rs's PARAMS
    float wds[n];
    int adapt[n];
    double lr_scales[n];
    std::vector<u64> offsets(n);
    std::vector<std::vector<float>> params(n);
    size_t total = 0;
    for (int i = 0; i < n; ++i) {
        offsets[i] = total;
        total += numel[i];
        wds[i] = i < 4 ? (float)wd0 : 0.0f;
        adapt[i] = (i < 4 && wd0 != 0.0) || always_adapt;
        lr_scales[i] = i < 4 ? 1.0 : 0.25;  // the second group steps at a quarter of the rate
        rng_state = 1000 + seed_index[i];
        params[i].resize(numel[i]);
        for (auto& x : params[i]) x = uniform();
    }
    auto flat_params = [&] {
        std::vector<float> f;
        for (auto& p : params) f.insert(f.end(), p.begin(), p.end());
        return f;
    };
    auto init = flat_params();
    write("params_init.bin", init.data(), init.size() * 4);

    // The chunk table, as `chunk_table` in lamb.rs.
    const unsigned chunk = 16384;
    std::vector<unsigned> chunks, tensor_chunks;
    for (int t = 0; t < n; ++t) {
        unsigned first = chunks.size() / 3;
        for (unsigned s = 0; s < numel[t]; s += chunk) {
            unsigned len = std::min<size_t>(chunk, numel[t] - s);
            chunks.insert(chunks.end(), {(unsigned)t, s, len});
        }
        tensor_chunks.push_back(first);
        tensor_chunks.push_back(chunks.size() / 3 - first);
    }
    unsigned num_chunks = chunks.size() / 3;
    std::vector<float> m(total, 0.f), v(total, 0.f), grad_partial(num_chunks), w_sumsq(num_chunks),
        u_sumsq(num_chunks);
    double scalars[4];

    const float scales[] = {1e-3f, 2e-3f, 0.5f, 1e-3f, 0.05f, 1e-3f};
    const int nans[] = {0, 0, 0, 1, 0, 0};
    const double lrs[] = {0.01, 0.02, 0.05, 0.05, 0.03, 0.01};
    uint64_t step = 0;
    for (int k = 0; k < 6; ++k) {
        std::vector<std::vector<float>> grads(n);
        std::vector<u64> param_ptrs(n), grad_ptrs(n);
        std::vector<float> grads_flat;
        std::vector<unsigned char> mask(n);
        for (int i = 0; i < n; ++i) {
            bool has = !(i == 3 || (k == 2 && i == 6));  // unused.weight never, fc.bias not at 2
            mask[i] = has;
            grads[i].assign(numel[i], 0.f);
            if (has) {
                rng_state = k * 100 + (uint64_t)i;
                for (auto& x : grads[i]) x = uniform() * scales[k];
                if (nans[k] && i == 1) grads[i][123] = NAN;
            }
            grads_flat.insert(grads_flat.end(), grads[i].begin(), grads[i].end());
            param_ptrs[i] = (u64)params[i].data();
            grad_ptrs[i] = has ? (u64)grads[i].data() : 0;
        }
        std::string ks = std::to_string(k);
        write("grads_" + ks + ".bin", grads_flat.data(), grads_flat.size() * 4);
        write("mask_" + ks + ".bin", mask.data(), n);

        // The scalars, as `CudaLamb::step`.
        double t = (double)(step + 1);
        double beta3 = grad_averaging ? 1.0 - beta1 : 1.0;
        double bc1 = 1.0, bc2 = 1.0;
        if (bias_correction) { bc1 = 1.0 - std::pow(beta1, t); bc2 = 1.0 - std::pow(beta2, t); }
        float inv_bc1 = (float)(1.0 / bc1), inv_bc2_sqrt = (float)(1.0 / std::sqrt(bc2));
        float b1 = (float)beta1, b2 = (float)beta2, b3 = (float)beta3;
        float one_minus_b2 = (float)(1.0 - beta2), eps = (float)eps_d;
        double lr = lrs[k];

        launch("lamb_grad_sumsq", num_chunks, 256, [&] { lamb_grad_sumsq(chunks.data(), grad_ptrs.data(), grad_partial.data()); });
        launch("lamb_global_norm", 1, 256, [&] { lamb_global_norm(grad_partial.data(), num_chunks, has_max, 1.0, scalars); });
        launch("lamb_moments", num_chunks, 256, [&] {
            lamb_moments(chunks.data(), param_ptrs.data(), grad_ptrs.data(), offsets.data(), wds, adapt,
                         m.data(), v.data(), scalars, b1, b3, b2, one_minus_b2, inv_bc1, inv_bc2_sqrt,
                         eps, w_sumsq.data(), u_sumsq.data());
        });
        launch("lamb_apply", num_chunks, 256, [&] {
            lamb_apply(chunks.data(), tensor_chunks.data(), param_ptrs.data(), grad_ptrs.data(),
                       offsets.data(), wds, adapt, m.data(), v.data(), scalars, w_sumsq.data(),
                       u_sumsq.data(), inv_bc1, inv_bc2_sqrt, eps, lr, lr_scales,
                       trust_clip);
        });
        if (scalars[3] == 0.0) step++;
        auto out = flat_params();
        write("params_" + ks + ".bin", out.data(), out.size() * 4);
        write("exp_avg_" + ks + ".bin", m.data(), m.size() * 4);
        write("exp_avg_sq_" + ks + ".bin", v.data(), v.size() * 4);
        double report[4] = {scalars[0], scalars[1], scalars[3], (double)step};
        write("report_" + ks + ".bin", report, sizeof report);
    }
    return 0;
}
