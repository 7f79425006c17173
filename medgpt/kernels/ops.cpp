// medgpt's CPU decode kernels as PyTorch operators: torch.ops.medgpt.small_linear and
// torch.ops.medgpt.decode_attention.
//
// The loops are in small_linear.h and decode_attention.h (AVX2/FMA + OpenMP); this file
// checks every tensor before a pointer is taken, so that a wrong shape, dtype, device or
// layout is a RuntimeError naming the argument instead of a read or write out of bounds.
// Only the headers the operators need are included, not torch/extension.h: the first build
// on a machine compiles this file, and the whole of ATen and pybind11 would take several
// times as long.
//
// Built and loaded by medgpt/kernels/__init__.py with torch.ops.load_library.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "decode_attention.h"
#include "small_linear.h"

namespace {

void check_cpu_float(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK(t.device().is_cpu(), "medgpt::", op, ": ", name, " must be on the CPU, got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat, "medgpt::", op, ": ", name,
                " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "medgpt::", op, ": ", name,
                " must be contiguous (call .contiguous() first), got strides ", t.strides(),
                " for shape ", t.sizes());
}

// y = x @ weight^T + bias over x's last dimension: nn.Linear's forward for float32 x of
// any leading shape, each row computed alone (the same numbers in any batch).
at::Tensor small_linear(const at::Tensor& x, const at::Tensor& weight,
                        const std::optional<at::Tensor>& bias) {
    check_cpu_float(x, "small_linear", "x");
    check_cpu_float(weight, "small_linear", "weight");
    TORCH_CHECK(x.dim() >= 1, "medgpt::small_linear: x must have at least one dimension");
    TORCH_CHECK(weight.dim() == 2,
                "medgpt::small_linear: weight must be 2-D (out_features, in_features), got "
                "shape ",
                weight.sizes());
    const int64_t K = weight.size(1), N = weight.size(0);
    TORCH_CHECK(x.size(-1) == K, "medgpt::small_linear: x's last dimension (", x.size(-1),
                ") must equal weight's in_features (", K, "); x is ", x.sizes(),
                ", weight is ", weight.sizes());
    const float* b = nullptr;
    if (bias.has_value()) {
        check_cpu_float(*bias, "small_linear", "bias");
        TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N,
                    "medgpt::small_linear: bias must have shape (", N, "), got ",
                    bias->sizes());
        b = bias->data_ptr<float>();
    }
    std::vector<int64_t> shape = x.sizes().vec();
    shape.back() = N;
    at::Tensor y = at::empty(shape, x.options());
    const int64_t M = K > 0 ? x.numel() / K : 0;
    if (M > 0 && N > 0)
        medgpt_small_linear(x.data_ptr<float>(), weight.data_ptr<float>(), b,
                            y.data_ptr<float>(), M, K, N, at::get_num_threads());
    return y;
}

// One decode step's attention for rows at their own positions; see decode_attention.h.
// Writes row b's new key and value at positions[b] of cache row b (only after every check
// has passed) and returns (B, n_head, head_dim).
at::Tensor decode_attention(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& positions) {
    check_cpu_float(qkv, "decode_attention", "qkv");
    check_cpu_float(k_cache, "decode_attention", "k_cache");
    check_cpu_float(v_cache, "decode_attention", "v_cache");
    TORCH_CHECK(qkv.dim() == 4 && qkv.size(1) == 3,
                "medgpt::decode_attention: qkv must be (batch, 3, n_head, head_dim), got shape ",
                qkv.sizes());
    const int64_t B = qkv.size(0), H = qkv.size(2), D = qkv.size(3);
    TORCH_CHECK(k_cache.dim() == 4,
                "medgpt::decode_attention: k_cache must be (rows, n_head, max_len, head_dim), "
                "got shape ",
                k_cache.sizes());
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes(),
                "medgpt::decode_attention: v_cache must have k_cache's shape ", k_cache.sizes(),
                ", got ", v_cache.sizes());
    TORCH_CHECK(k_cache.size(0) >= B, "medgpt::decode_attention: the caches have ",
                k_cache.size(0), " rows, fewer than qkv's batch of ", B);
    TORCH_CHECK(k_cache.size(1) == H && k_cache.size(3) == D,
                "medgpt::decode_attention: the caches' n_head and head_dim (", k_cache.size(1),
                ", ", k_cache.size(3), ") must match qkv's (", H, ", ", D, ")");
    TORCH_CHECK(positions.device().is_cpu(),
                "medgpt::decode_attention: positions must be on the CPU, got ",
                positions.device());
    TORCH_CHECK(positions.scalar_type() == at::kLong,
                "medgpt::decode_attention: positions must be int64, got ",
                positions.scalar_type());
    TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B,
                "medgpt::decode_attention: positions must have shape (", B, "), got ",
                positions.sizes());
    TORCH_CHECK(positions.is_contiguous(),
                "medgpt::decode_attention: positions must be contiguous");
    const int64_t T = k_cache.size(2);
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; b++)
        TORCH_CHECK(pos[b] >= 0 && pos[b] < T, "medgpt::decode_attention: positions must be in 0..",
                    T - 1, " (the caches' max_len is ", T, "), got ", pos[b], " for row ", b);
    at::Tensor y = at::empty({B, H, D}, qkv.options());
    if (B == 0 || H == 0) return y;
    // Allocated before anything is written: if memory runs out, the caches are untouched.
    at::Tensor scratch = at::empty({B * H * T}, qkv.options());
    medgpt_decode_attention(qkv.data_ptr<float>(), k_cache.data_ptr<float>(),
                            v_cache.data_ptr<float>(), pos, y.data_ptr<float>(), B, H, T, D,
                            // D ** -0.5 in double, then float: the scale the ctypes build was passed
                            static_cast<float>(std::pow(static_cast<double>(D), -0.5)), at::get_num_threads(),
                            scratch.data_ptr<float>());
    return y;
}

}  // namespace

TORCH_LIBRARY(medgpt, m) {
    m.def("small_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    // (a!) and (b!): the caches are written in place, which the dispatcher must know.
    m.def("decode_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, "
          "Tensor positions) -> Tensor");
}

TORCH_LIBRARY_IMPL(medgpt, CPU, m) {
    m.impl("small_linear", &small_linear);
    m.impl("decode_attention", &decode_attention);
}
