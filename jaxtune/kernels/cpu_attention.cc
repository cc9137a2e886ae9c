// Fused causal attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Built and loaded by jaxtune/kernels/cpu_attention.py (g++ -O3 -march=native, once per
// machine); that module holds the contract and why the kernel exists: XLA:CPU runs attention
// as many small batched matmuls and row reductions over materialised [B, N, T, S]
// probabilities, three times the time of a fused kernel. The tests compare it with the
// pure-XLA reference in jaxtune/kernels/splash.py.
//
// Axis letters: B batch, T length (queries are the keys), N query heads, K key/value heads,
// G = N / K query heads per KV head, H head dim. Inputs keep the model's [B, T, N, H] layout;
// each (row b, KV head) is one unit of work that packs its keys and values once and loops over
// its G query heads and 64-row query blocks, so no unit writes another's outputs (the
// backward's dK / dV accumulate inside the unit). A query i sees key j when j <= i, both have
// the same segment id and, with a window w > 0 (a scalar operand, so a scan over layers can
// give each layer its own), i - j < w. The forward keeps each block's whole row of logits (not
// an online softmax): two passes, as XLA's softmax, and the log-sum-exp it saves lets the
// backward recompute the probabilities without storing them.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector: one AVX-512 register, or one AVX2 register (so that the micro-kernel's
// accumulators fit the 16 registers AVX2 has).
#ifdef __AVX512F__
constexpr int kLanes = 16;
constexpr int kRows = 8;              // rows of C per micro-kernel: 16 of the 32 registers
#else
constexpr int kLanes = 8;
constexpr int kRows = 4;              // 8 of the 16 registers
#endif
constexpr int kCols = 2 * kLanes;     // columns of C per micro-kernel
constexpr int64_t kBlockQ = 64;       // query rows per block

typedef float vf __attribute__((vector_size(4 * kLanes)));
typedef float vfu __attribute__((vector_size(4 * kLanes), aligned(4)));  // unaligned access
typedef int32_t vi __attribute__((vector_size(4 * kLanes)));

// An empty asm that takes a vector in a register: the compiler must materialise it there.
#if defined(__x86_64__)
#define KEEP_IN_REGISTER(x) "+v"(x)
#elif defined(__aarch64__)
#define KEEP_IN_REGISTER(x) "+w"(x)
#else
#define KEEP_IN_REGISTER(x) "+g"(x)
#endif

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf x) { *reinterpret_cast<vfu*>(p) = x; }
inline vf splat(float x) { return vf{} + x; }

// C[kRows x kLanes*NV] (+)= A[kRows x depth] B[depth x kLanes*NV]. A's element (r, p) is at
// A[r * a_rs + p * a_cs] (any layout: it is read one scalar at a time); B is row-major.
template <int NV>
inline void micro(int64_t depth, const float* A, int64_t a_rs, int64_t a_cs, const float* B,
                  int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  vf c[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? load(C + r * ldc + v * kLanes) : vf{};
  for (int64_t p = 0; p < depth; ++p) {
    // Keep B's vectors in registers: folded into each FMA as a memory operand, they would be
    // loaded once per row and make the loop load-bound.
    vf b0 = load(B + p * ldb), b1 = NV > 1 ? load(B + p * ldb + kLanes) : vf{};
    __asm__("" : KEEP_IN_REGISTER(b0), KEEP_IN_REGISTER(b1));
    const vf b[2] = {b0, b1};
    for (int r = 0; r < kRows; ++r) {
      const float a = A[r * a_rs + p * a_cs];
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + v * kLanes, c[r][v]);
}

// C[M x N] (+)= A[M x depth] B[depth x N], M a multiple of kRows, N of kLanes. Column panels
// outside, so each panel of B stays in cache while every row block passes over it.
void gemm(int64_t M, int64_t N, int64_t depth, const float* A, int64_t a_rs, int64_t a_cs,
          const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < N; j += kCols) {
    const bool two = N - j >= kCols;
    for (int64_t i = 0; i < M; i += kRows) {
      const float* a = A + i * a_rs;
      float* c = C + i * ldc + j;
      if (two) {
        micro<2>(depth, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate);
      } else {
        micro<1>(depth, a, a_rs, a_cs, B + j, ldb, c, ldc, accumulate);
      }
    }
  }
}

// exp for float lanes: 2^n * e^r with |r| <= ln2/2 and a degree-6 polynomial (relative error
// about 2e-7, as a libm expf to within an ulp or two). Inputs below -87 give about 1e-38.
inline vf vexp(vf x) {
  const vf hi = splat(88.3f), lo = splat(-87.3f);
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf n = (x * splat(1.44269504088896341f) + shifter) - shifter;
  vf r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  vf p = splat(1.0f / 720);
  p = p * r + splat(1.0f / 120);
  p = p * r + splat(1.0f / 24);
  p = p * r + splat(1.0f / 6);
  p = p * r + splat(0.5f);
  p = p * r + splat(1.0f);
  p = p * r + splat(1.0f);
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;
  vf two_n;
  std::memcpy(&two_n, &e, sizeof(two_n));
  return p * two_n;
}

inline float hmax(vf x) {
  float m = x[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, x[l]);
  return m;
}
inline float hsum(vf x) {
  float s = 0;
  for (int l = 0; l < kLanes; ++l) s += x[l];
  return s;
}

// Run fn(u) for u in [0, n) on the calling thread and XLA's intra-op threads. Tasks claim
// units from a shared counter, so one that starts late (or never, on a busy pool) only finds
// nothing left; the caller waits for the units claimed, never for a task to start.
template <typename Fn>
void parallel_units(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, &fn]() {
    int64_t finished = 0;
    for (int64_t u; (u = state->next.fetch_add(1)) < n; ++finished) fn(u);
    if (finished) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->done += finished;
      if (state->done == n) state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([run]() { run(); });
  run();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done == n; });
}

struct Dims {
  int64_t B, T, N, K, H, G, Hp, Tp;
  Dims(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k) {
    auto qd = q.dimensions(), kd = k.dimensions();
    B = qd[0], T = qd[1], N = qd[2], H = qd[3], K = kd[2];
    G = N / K;
    Hp = round_up(H, kLanes);
    Tp = round_up(T, kCols) + kCols;  // room for a block's padded key range
  }
};

// Copies x[b, :, head, :] of an [B, T, heads, H] array into a zeroed row-major [Tp x Hp]
// (rows = positions) or, transposed, an [Hp x Tp] buffer.
void pack(const float* x, const Dims& d, int64_t heads, int64_t b, int64_t head, float* rows,
          float* cols) {
  if (rows) std::fill(rows, rows + d.Tp * d.Hp, 0.0f);
  if (cols) std::fill(cols, cols + d.Hp * d.Tp, 0.0f);
  for (int64_t t = 0; t < d.T; ++t) {
    const float* src = x + ((b * d.T + t) * heads + head) * d.H;
    if (rows) std::memcpy(rows + t * d.Hp, src, d.H * sizeof(float));
    if (cols)
      for (int64_t h = 0; h < d.H; ++h) cols[h * d.Tp + t] = src[h];
  }
}

// One query block: rows [i0, i0 + rows) (mrows with padding) against keys [lo, lo + cols), of
// which the first `valid` exist. Keys after the block's last row are never seen (causal); keys
// before `lo` are unseen by every row of the block, being before the window or in other
// segments (packed documents), so they are skipped, not masked.
struct Block {
  int64_t i0, rows, mrows, lo, valid, cols;
  Block(const Dims& d, const int32_t* seg, int64_t i0_, int64_t window) : i0(i0_) {
    rows = std::min(kBlockQ, d.T - i0);
    mrows = round_up(rows, kRows);
    const int64_t end = i0 + rows;
    int64_t first = window > 0 ? std::max<int64_t>(0, i0 - window + 1) : 0;
    int32_t segs[kBlockQ];
    int n = 0;
    for (int64_t i = i0; i < end; ++i)
      if (n == 0 || segs[n - 1] != seg[i]) segs[n++] = seg[i];
    for (bool seen = false; first < i0 && !seen; first += !seen)
      for (int s = 0; s < n && !seen; ++s) seen = seg[first] == segs[s];
    lo = first / kCols * kCols;
    valid = end - lo;
    cols = round_up(valid, kCols);
  }
};

// The masked, scaled logits of row i at keys j..j+kLanes (`s` holds q.k there): q.k * scale
// where query i may see key j, -inf elsewhere (padding included: its segment is INT32_MIN).
struct RowMask {
  vi i, seg_i, window;
  vf scale;
  const int32_t* seg;  // the row's segments, padded to Tp
  RowMask(int64_t i_, const int32_t* seg_, float scale_, int64_t window_)
      : i(vi{} + int32_t(i_)),
        seg_i(vi{} + seg_[i_]),
        window(vi{} + int32_t(window_ > 0 ? std::min<int64_t>(window_, INT32_MAX) : INT32_MAX)),
        scale(splat(scale_)),
        seg(seg_) {}
  inline vf operator()(const float* s, int64_t j) const {
    vi jv = vi{} + int32_t(j);
    for (int l = 0; l < kLanes; ++l) jv[l] += l;
    vi seg_j;
    std::memcpy(&seg_j, seg + j, sizeof(seg_j));
    const vi ok = (jv <= i) & (seg_j == seg_i) & ((i - jv) < window);
    return ok ? load(s) * scale : splat(-INFINITY);
  }
};

// Scratch for one unit, kept per thread across calls.
struct Scratch {
  std::vector<float> kt, kr, vt, vr, dk, dv, q, dout, s, dp, out;
  std::vector<int32_t> seg;
  // Row b's segment ids, padded to Tp with a segment no query has.
  const int32_t* row_segments(const int32_t* row, const Dims& d) {
    seg.assign(d.Tp + kLanes, INT32_MIN);
    std::copy(row, row + d.T, seg.begin());
    return seg.data();
  }
  static Scratch& local() {
    thread_local Scratch scratch;
    return scratch;
  }
};

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                   ffi::Buffer<ffi::S32> window_, float scale, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d(q, k);
  const int64_t window = *window_.typed_data();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* segp = seg.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_units(pool, d.B * d.K, [&](int64_t unit) {
    const int64_t b = unit / d.K, kh = unit % d.K;
    Scratch& w = Scratch::local();
    w.kt.resize(d.Hp * d.Tp);
    w.vr.resize(d.Tp * d.Hp);
    w.q.assign(kBlockQ * d.Hp, 0.0f);
    w.s.resize(kBlockQ * d.Tp);
    w.out.resize(kBlockQ * d.Hp);
    pack(kp, d, d.K, b, kh, nullptr, w.kt.data());
    pack(vp, d, d.K, b, kh, w.vr.data(), nullptr);
    const int32_t* sg = w.row_segments(segp + b * d.T, d);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t n = kh * d.G + g;
      for (int64_t i0 = 0; i0 < d.T; i0 += kBlockQ) {
        const Block blk(d, sg, i0, window);
        std::fill(w.q.begin(), w.q.end(), 0.0f);
        for (int64_t r = 0; r < blk.rows; ++r)
          std::memcpy(&w.q[r * d.Hp], qp + ((b * d.T + i0 + r) * d.N + n) * d.H,
                      d.H * sizeof(float));
        float* s = w.s.data();
        gemm(blk.mrows, blk.cols, d.Hp, w.q.data(), d.Hp, 1, w.kt.data() + blk.lo, d.Tp, s,
             blk.cols, false);
        for (int64_t r = 0; r < blk.mrows; ++r) {
          float* row = s + r * blk.cols;
          if (r >= blk.rows) {
            std::fill(row, row + blk.cols, 0.0f);
            continue;
          }
          const RowMask mask(i0 + r, sg, scale, window);
          vf m = splat(-INFINITY);
          for (int64_t c = 0; c < blk.cols; c += kLanes) {
            vf x = mask(row + c, blk.lo + c);
            store(row + c, x);
            m = x > m ? x : m;
          }
          const float mx = hmax(m);
          vf sum = vf{};
          for (int64_t c = 0; c < blk.cols; c += kLanes) {
            vf x = load(row + c);
            vf e = vexp(x - mx);
            e = x == splat(-INFINITY) ? vf{} : e;
            store(row + c, e);
            sum += e;
          }
          const float total = hsum(sum);
          const vf inv = splat(1.0f / total);
          for (int64_t c = 0; c < blk.cols; c += kLanes) store(row + c, load(row + c) * inv);
          lp[(b * d.N + n) * d.T + i0 + r] = mx + std::log(total);
        }
        gemm(blk.mrows, d.Hp, blk.cols, s, blk.cols, 1, w.vr.data() + blk.lo * d.Hp, d.Hp,
             w.out.data(), d.Hp, false);
        for (int64_t r = 0; r < blk.rows; ++r)
          std::memcpy(op + ((b * d.T + i0 + r) * d.N + n) * d.H, &w.out[r * d.Hp],
                      d.H * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                    ffi::Buffer<ffi::S32> window_, ffi::Buffer<ffi::F32> out,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, float scale,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                    ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d(q, k);
  const int64_t window = *window_.typed_data();
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = out.typed_data(), *lp = lse.typed_data(), *dop = dout.typed_data();
  const int32_t* segp = seg.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_units(pool, d.B * d.K, [&](int64_t unit) {
    const int64_t b = unit / d.K, kh = unit % d.K;
    Scratch& w = Scratch::local();
    w.kt.resize(d.Hp * d.Tp);
    w.kr.resize(d.Tp * d.Hp);
    w.vt.resize(d.Hp * d.Tp);
    w.dk.assign(d.Tp * d.Hp, 0.0f);
    w.dv.assign(d.Tp * d.Hp, 0.0f);
    w.q.resize(kBlockQ * d.Hp);
    w.dout.resize(kBlockQ * d.Hp);
    w.s.resize(kBlockQ * d.Tp);
    w.dp.resize(kBlockQ * d.Tp);
    w.out.resize(kBlockQ * d.Hp);
    pack(kp, d, d.K, b, kh, w.kr.data(), w.kt.data());
    pack(vp, d, d.K, b, kh, nullptr, w.vt.data());
    const int32_t* sg = w.row_segments(segp + b * d.T, d);
    std::vector<float> delta(kBlockQ);
    for (int64_t g = 0; g < d.G; ++g) {
      const int64_t n = kh * d.G + g;
      for (int64_t i0 = 0; i0 < d.T; i0 += kBlockQ) {
        const Block blk(d, sg, i0, window);
        std::fill(w.q.begin(), w.q.end(), 0.0f);
        std::fill(w.dout.begin(), w.dout.end(), 0.0f);
        for (int64_t r = 0; r < blk.rows; ++r) {
          const int64_t at = ((b * d.T + i0 + r) * d.N + n) * d.H;
          std::memcpy(&w.q[r * d.Hp], qp + at, d.H * sizeof(float));
          std::memcpy(&w.dout[r * d.Hp], dop + at, d.H * sizeof(float));
          float dot = 0;  // delta_i = dO_i . O_i = sum_j P_ij dP_ij
          for (int64_t h = 0; h < d.H; ++h) dot += dop[at + h] * op[at + h];
          delta[r] = dot;
        }
        float *s = w.s.data(), *dp = w.dp.data();
        gemm(blk.mrows, blk.cols, d.Hp, w.q.data(), d.Hp, 1, w.kt.data() + blk.lo, d.Tp, s,
             blk.cols, false);
        gemm(blk.mrows, blk.cols, d.Hp, w.dout.data(), d.Hp, 1, w.vt.data() + blk.lo, d.Tp,
             dp, blk.cols, false);
        for (int64_t r = 0; r < blk.mrows; ++r) {
          float *row = s + r * blk.cols, *drow = dp + r * blk.cols;
          if (r >= blk.rows) {
            std::fill(row, row + blk.cols, 0.0f);
            std::fill(drow, drow + blk.cols, 0.0f);
            continue;
          }
          const RowMask mask(i0 + r, sg, scale, window);
          const float l = lp[(b * d.N + n) * d.T + i0 + r];
          const vf dl = splat(delta[r]), sc = splat(scale);
          for (int64_t c = 0; c < blk.cols; c += kLanes) {
            vf x = mask(row + c, blk.lo + c);
            vf p = vexp(x - l);
            p = x == splat(-INFINITY) ? vf{} : p;
            store(row + c, p);                                   // P
            store(drow + c, p * (load(drow + c) - dl) * sc);     // dS, d(q.k) of the logits
          }
        }
        // dV += P^T dO, dK += dS^T Q (over this block's keys), dQ = dS K.
        gemm(blk.cols, d.Hp, blk.mrows, s, 1, blk.cols, w.dout.data(), d.Hp,
             w.dv.data() + blk.lo * d.Hp, d.Hp, true);
        gemm(blk.cols, d.Hp, blk.mrows, dp, 1, blk.cols, w.q.data(), d.Hp,
             w.dk.data() + blk.lo * d.Hp, d.Hp, true);
        gemm(blk.mrows, d.Hp, blk.cols, dp, blk.cols, 1, w.kr.data() + blk.lo * d.Hp, d.Hp,
             w.out.data(), d.Hp, false);
        for (int64_t r = 0; r < blk.rows; ++r)
          std::memcpy(dqp + ((b * d.T + i0 + r) * d.N + n) * d.H, &w.out[r * d.Hp],
                      d.H * sizeof(float));
      }
    }
    for (int64_t t = 0; t < d.T; ++t) {
      const int64_t at = ((b * d.T + t) * d.K + kh) * d.H;
      std::memcpy(dkp + at, &w.dk[t * d.Hp], d.H * sizeof(float));
      std::memcpy(dvp + at, &w.dv[t * d.Hp], d.H * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxtuneCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
