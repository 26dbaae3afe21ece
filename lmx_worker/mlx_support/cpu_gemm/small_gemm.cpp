// y = x @ w.T for a few rows of x (a decode step), float32, on MLX's CPU
// stream: the kernel and the MLX primitive that runs it (see __init__.py for
// why, and for how this file is built).
#include <algorithm>
#include <cstddef>
#include <sstream>
#include <stdexcept>
#include <vector>

#include <nanobind/nanobind.h>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace {

// A block of 4 rows of x by 3 rows of w: 12 accumulators plus the 3 weight
// vectors and one of x fit in 16 vector registers (AVX2; AVX-512 and NEON
// have 32). Measured here with AVX-512 against 8 x 3 blocks of 16-float
// vectors: as fast at 8 rows (37-38 ms for a SmolLM2 step's matmuls against
// 38-39) and faster at 12 (46-47 against 61: no rows left over). The
// compiler maps `vec` onto the host's instructions (-march=native).
constexpr int kLanes = 8;
constexpr int kBlockRows = 4;
#define LMX_BLOCK_ROWS(X) X(0) X(1) X(2) X(3)
constexpr int kBlockCols = 3;  // rows of w a block reads together

typedef float vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }

// A tree, not a running sum (kLanes dependent additions per output cost as
// much as its dot product): the compiler turns the halving into shuffles.
inline float lane_sum(vec v) {
  float s[kLanes];
  __builtin_memcpy(s, &v, sizeof(s));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int i = 0; i < width; i++) s[i] += s[i + width];
  return s[0];
}

// One output: the dot product of a row of x and a row of w.
inline void dot1(int K, const float* x, const float* w, float* y) {
  vec a = {0};
  for (int k = 0; k < K; k += kLanes) a += load(x + k) * load(w + k);
  *y = lane_sum(a);
}

// Rows [n0, n1) of w against every row of x. Each weight row is read from
// memory once: a block of kBlockRows rows of x by kBlockCols rows of w keeps
// its accumulators in registers (named, not an array, so GCC does), and the
// rows of x past the last whole block reuse the weight rows from cache.
void rows(int M, int N, int K, const float* x, const float* w, float* y, int n0, int n1) {
  int n = n0;
  for (; n + kBlockCols <= n1; n += kBlockCols) {
    const float* w0 = w + static_cast<size_t>(n) * K;
    const float* w1 = w0 + K;
    const float* w2 = w1 + K;
    int m = 0;
    for (; m + kBlockRows <= M; m += kBlockRows) {
      const float* xm = x + static_cast<size_t>(m) * K;
#define LMX_ZERO(i) vec a##i##0 = {0}, a##i##1 = {0}, a##i##2 = {0};
      LMX_BLOCK_ROWS(LMX_ZERO)
#undef LMX_ZERO
      for (int k = 0; k < K; k += kLanes) {
        vec b0 = load(w0 + k), b1 = load(w1 + k), b2 = load(w2 + k);
#define LMX_FMA(i)                                              \
  {                                                             \
    vec c = load(xm + static_cast<size_t>(i) * K + k);          \
    a##i##0 += c * b0;                                          \
    a##i##1 += c * b1;                                          \
    a##i##2 += c * b2;                                          \
  }
        LMX_BLOCK_ROWS(LMX_FMA)
#undef LMX_FMA
      }
#define LMX_STORE(i)                                            \
  {                                                             \
    float* yr = y + static_cast<size_t>(m + i) * N + n;         \
    yr[0] = lane_sum(a##i##0);                                  \
    yr[1] = lane_sum(a##i##1);                                  \
    yr[2] = lane_sum(a##i##2);                                  \
  }
      LMX_BLOCK_ROWS(LMX_STORE)
#undef LMX_STORE
    }
    for (; m < M; m++) {
      const float* xr = x + static_cast<size_t>(m) * K;
      float* yr = y + static_cast<size_t>(m) * N + n;
      for (int j = 0; j < kBlockCols; j++) dot1(K, xr, w0 + static_cast<size_t>(j) * K, yr + j);
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
      // Strided operands are gathered here: x is a few rows; a routed
      // layer's weight was made contiguous once when routed (cpu_gemm), so a
      // strided one only comes from a direct call.
      std::vector<float> x_rows, w_rows;
      const float* xp = x.flags().row_contiguous ? x.data<float>() : (x_rows = gather(x)).data();
      const float* wp = w.flags().row_contiguous ? w.data<float>() : (w_rows = gather(w)).data();
      small_gemm(M, N, K, xp, wp, out.data<float>(), threads);
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
  auto primitive = std::make_shared<SmallGemm>(stream, std::max(1, threads));
  return mx::array(shape, mx::float32, std::move(primitive), {x, w});
}

}  // namespace

NB_MODULE(_small_gemm, m) {
  nb::module_::import_("mlx.core");  // registers mx.array's type with nanobind
  m.attr("LANES") = kLanes;
  m.def("matmul_wt", &matmul_wt, nb::arg("x"), nb::arg("w"), nb::arg("threads"),
        "x @ w.T for float32 x (..., K) and w (N, K), K a multiple of LANES.");
}
