// y = x @ w.T for a few rows of x (a decode step), float32, on MLX's CPU
// stream: the kernel and the MLX primitive that runs it (see __init__.py for
// why, and for how this file is built).
#include <omp.h>

#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// The compiler maps this onto whatever the host has (the build uses
// -march=native): one AVX-512 register, two AVX2 ones, four NEON ones.
constexpr int kLanes = 16;
typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }

typedef float half_vec __attribute__((vector_size(kLanes / 2 * sizeof(float))));
typedef float quarter_vec __attribute__((vector_size(kLanes / 4 * sizeof(float))));

// A tree, not a running sum (16 dependent additions per output cost more
// than the dot product): halves add lane-wise in vector registers.
inline float lane_sum(vec v) {
  half_vec h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
               __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  quarter_vec q = __builtin_shufflevector(h, h, 0, 1, 2, 3) +
                  __builtin_shufflevector(h, h, 4, 5, 6, 7);
  return (q[0] + q[2]) + (q[1] + q[3]);
}

// One output: the dot product of row m of x and row n of w.
inline void dot1(int K, const float* x, const float* w, float* y) {
  vec a = {0};
  for (int k = 0; k < K; k += kLanes) a += load(x + k) * load(w + k);
  *y = lane_sum(a);
}

// Rows [n0, n1) of w against every row of x. Each weight row is read from
// memory once: 8 rows of x x 3 rows of w at a time keep 24 accumulators in
// registers, so a k-chunk costs 11 loads for 24 multiply-adds.
void rows(int M, int N, int K, const float* x, const float* w, float* y, int n0, int n1) {
  constexpr int MR = 8, NR = 3;
  int n = n0;
  for (; n + NR <= n1; n += NR) {
    const float* w0 = w + static_cast<size_t>(n) * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    int m = 0;
    for (; m + MR <= M; m += MR) {
      const float* xm = x + static_cast<size_t>(m) * K;
      // Named accumulators, not an array: GCC keeps these in registers.
#define LMX_ROW(i)                                              \
  vec a##i##0 = {0}, a##i##1 = {0}, a##i##2 = {0};
      LMX_ROW(0) LMX_ROW(1) LMX_ROW(2) LMX_ROW(3) LMX_ROW(4) LMX_ROW(5) LMX_ROW(6) LMX_ROW(7)
#undef LMX_ROW
      for (int k = 0; k < K; k += kLanes) {
        vec b0 = load(w0 + k), b1 = load(w1 + k), b2 = load(w2 + k);
#define LMX_ROW(i)                                              \
  {                                                             \
    vec c = load(xm + static_cast<size_t>(i) * K + k);          \
    a##i##0 += c * b0;                                          \
    a##i##1 += c * b1;                                          \
    a##i##2 += c * b2;                                          \
  }
        LMX_ROW(0) LMX_ROW(1) LMX_ROW(2) LMX_ROW(3) LMX_ROW(4) LMX_ROW(5) LMX_ROW(6) LMX_ROW(7)
#undef LMX_ROW
      }
#define LMX_ROW(i)                                              \
  {                                                             \
    float* yr = y + static_cast<size_t>(m + i) * N + n;         \
    yr[0] = lane_sum(a##i##0);                                  \
    yr[1] = lane_sum(a##i##1);                                  \
    yr[2] = lane_sum(a##i##2);                                  \
  }
      LMX_ROW(0) LMX_ROW(1) LMX_ROW(2) LMX_ROW(3) LMX_ROW(4) LMX_ROW(5) LMX_ROW(6) LMX_ROW(7)
#undef LMX_ROW
    }
    for (; m < M; m++) {
      const float* xr = x + static_cast<size_t>(m) * K;
      float* yr = y + static_cast<size_t>(m) * N + n;
      for (int j = 0; j < NR; j++) dot1(K, xr, w0 + static_cast<size_t>(j) * K, yr + j);
    }
  }
  for (; n < n1; n++)
    for (int m = 0; m < M; m++)
      dot1(K, x + static_cast<size_t>(m) * K, w + static_cast<size_t>(n) * K,
           y + static_cast<size_t>(m) * N + n);
}

void small_gemm(int M, int N, int K, const float* x, const float* w, float* y, int threads) {
  // Enough pieces that two or more threads end together; each piece a run
  // of whole weight rows.
  constexpr int kPieces = 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int p = 0; p < kPieces; p++) {
    int n0 = static_cast<int>(static_cast<long>(N) * p / kPieces);
    int n1 = static_cast<int>(static_cast<long>(N) * (p + 1) / kPieces);
    rows(M, N, K, x, w, y, n0, n1);
  }
}

// The elements of a strided array in row-major order.
std::vector<float> gather(const mx::array& a) {
  std::vector<float> dense(a.size());
  const float* base = a.data<float>();
  const auto& shape = a.shape();
  const auto& strides = a.strides();
  std::vector<int> index(shape.size(), 0);
  for (size_t i = 0; i < dense.size(); i++) {
    int64_t offset = 0;
    for (size_t d = 0; d < shape.size(); d++) offset += index[d] * strides[d];
    dense[i] = base[offset];
    for (size_t d = shape.size(); d-- > 0;) {  // next index, last axis fastest
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return dense;
}

class SmallGemm : public mx::Primitive {
 public:
  SmallGemm(mx::Stream stream, int threads) : mx::Primitive(stream), threads_(threads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    int K = static_cast<int>(w.shape(1));
    int N = static_cast<int>(w.shape(0));
    int M = static_cast<int>(x.size() / K);
    encoder.dispatch([x = mx::array::unsafe_weak_copy(x), w = mx::array::unsafe_weak_copy(w),
                      out = mx::array::unsafe_weak_copy(out), M, N, K,
                      threads = threads_]() mutable {
      const float* rows_of_x = x.data<float>();
      std::vector<float> packed;
      if (!x.flags().row_contiguous) {  // a few rows: gather them here
        packed = gather(x);
        rows_of_x = packed.data();
      }
      small_gemm(M, N, K, rows_of_x, w.data<float>(), out.data<float>(), threads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("small_gemm runs on the CPU only");
  }

  const char* name() const override { return "SmallGemm"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return threads_ == static_cast<const SmallGemm&>(other).threads_;
  }

 private:
  int threads_;
};

// x (..., K) float32, w (N, K) float32 -> (..., N). K must be a multiple of
// kLanes; the caller (Python) checks that and the dtypes.
mx::array matmul_wt(const mx::array& x, const mx::array& w, int threads) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 2 ||
      x.shape(-1) != w.shape(1) || w.shape(1) % kLanes != 0) {
    std::ostringstream msg;
    msg << "small_gemm: want float32 x (..., K) and w (N, K) with K % " << kLanes << " == 0";
    throw std::invalid_argument(msg.str());
  }
  auto stream = mx::default_stream(mx::Device::cpu);
  auto shape = x.shape();
  shape.back() = w.shape(0);
  // x's layout is only known once it is computed (eval_cpu gathers it if
  // need be); a weight is normally a computed, contiguous array already.
  bool weight_ready = w.status() != mx::array::Status::unscheduled && w.flags().row_contiguous;
  auto wc = weight_ready ? w : mx::contiguous(w, false, stream);
  return mx::array(shape, mx::float32, std::make_shared<SmallGemm>(stream, threads), {x, wc});
}

}  // namespace

NB_MODULE(_small_gemm, m) {
  nb::module_::import_("mlx.core");  // registers mx.array's type with nanobind
  m.attr("LANES") = kLanes;
  m.def("matmul_wt", &matmul_wt, nb::arg("x"), nb::arg("w"), nb::arg("threads"),
        "x @ w.T for float32 x (..., K) and w (N, K), K a multiple of LANES.");
}
