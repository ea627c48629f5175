// One decode step (one new token per row) through every decoder layer of an NF4 Llama-family model,
// in one parallel region: torch.classes.qkernels_cpu.DecodeStack, built once from the model's
// weights, norms and caches (qkernels.cpu.decode_stack) and run every step by qserve's
// `Decoder.decode_fused`. Per layer it computes what decode_fused's per-layer calls compute, with
// the same code (cpu_nf4.h's row kernel, cpu_decode.h's rope, attention and norm) and so the same bits:
//   q, k, v = h W^T (+ bias); k roped into the cache with v; attention; o = y Wo^T (+ bias);
//   h = RMSNorm(x += o); act = silu(h Wg^T) * (h Wu^T); h = RMSNorm(x += act Wd^T) with the next norm.
// Why: for a small model the per-layer path is some 150 thread forks and joins and 100 Python calls a
// step around weights of 0.06-0.9 MB, each costing microseconds the memory traffic does not need.
//
// How the threads share a step: each layer is five phases (the rows of q/k/v, the attention heads,
// the rows of o, of gate+up, of down), each cut into tasks that threads claim from an atomic counter.
// The thread that completes a phase's last task runs the phase's small serial epilogue (the cache
// write, the residual add and norm) and opens the next phase. So no thread ever waits for another
// that holds no task, whatever the number of threads that join (one that the OS schedules late finds
// phases drained and only waits for their epilogues), and the split never changes a value.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <atomic>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "cpu_decode.h"
#include "cpu_nf4.h"

#ifdef QK_AVX512
extern "C" __m512 Sleef_expf16_u10(__m512);  // in libtorch_cpu: torch's Vectorized<float>::exp on AVX-512

namespace {

using qkernels_nf4::WeightView;

constexpr int kWeights = 7;  // per layer: q, k, v, o, gate, up, down
enum Phase { kQKV, kAttention, kO, kGateUp, kDown, kPhases };

// torch's float silu on AVX-512, x / (1 + exp(-x)), then times up: F.silu(gate).mul_(up) bit for bit.
inline __m512 silu_mul16(__m512 g, __m512 u) {
  const __m512 e = Sleef_expf16_u10(_mm512_xor_ps(_mm512_set1_ps(-0.f), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u);
}

struct alignas(64) Counter {
  std::atomic<int64_t> v{0};
};

struct PhaseState {
  Counter claimed, done;
  int64_t tasks = 0;
};

// Spin (the other threads are a few microseconds from done), yielding now and then so that an
// oversubscribed machine still schedules the thread that holds the work.
inline void wait_while_equal(const std::atomic<int64_t>& current, int64_t phase) {
  for (int spins = 0; current.load(std::memory_order_acquire) == phase; ++spins) {
    _mm_pause();
    if (spins % 1024 == 1023) std::this_thread::yield();
  }
}

class DecodeStack : public torch::CustomClassHolder {
 public:
  DecodeStack(std::vector<at::Tensor> packed, std::vector<at::Tensor> absmax,
              c10::List<std::optional<at::Tensor>> nested_absmax, std::vector<at::Tensor> quant_map,
              c10::List<std::optional<at::Tensor>> nested_map, std::vector<double> offset,
              c10::List<std::optional<at::Tensor>> bias, std::vector<int64_t> shapes, int64_t blocksize,
              int64_t nested_blocksize, std::vector<at::Tensor> norms, std::vector<at::Tensor> k_caches,
              std::vector<at::Tensor> v_caches, std::vector<int64_t> windows, at::Tensor rope_table, int64_t heads,
              double eps, int64_t grain_weights)
      : packed_(std::move(packed)), absmax_(std::move(absmax)), quant_map_(std::move(quant_map)),
        offset_(std::move(offset)), norms_(std::move(norms)), k_caches_(std::move(k_caches)),
        v_caches_(std::move(v_caches)), windows_(std::move(windows)), rope_table_(std::move(rope_table)),
        H_(heads), eps_(static_cast<float>(eps)), nested_blocksize_(nested_blocksize) {
    const size_t n = packed_.size();
    L_ = static_cast<int64_t>(n / kWeights);
    TORCH_CHECK(L_ > 0 && n % kWeights == 0 && absmax_.size() == n && nested_absmax.size() == n &&
                    quant_map_.size() == n && nested_map.size() == n && offset_.size() == n && bias.size() == n &&
                    shapes.size() == 2 * n,
                "DecodeStack: every weight list must hold 7 entries (q, k, v, o, gate, up, down) per layer");
    TORCH_CHECK(norms_.size() == static_cast<size_t>(1 + 2 * L_) && k_caches_.size() == static_cast<size_t>(L_) &&
                    v_caches_.size() == static_cast<size_t>(L_) && windows_.size() == static_cast<size_t>(L_),
                "DecodeStack: 1 + 2 norms, a k and a v cache and a window per layer");
    for (size_t i = 0; i < n; ++i) {
      nested_absmax_.push_back(nested_absmax.get(i));
      nested_map_.push_back(nested_map.get(i));
      bias_.push_back(bias.get(i));
      N_.push_back(shapes[2 * i]);
      K_.push_back(shapes[2 * i + 1]);
    }
    bshift_ = qkernels_nf4::log2_exact(blocksize, "blocksize");
    TORCH_CHECK(blocksize >= 32, "DecodeStack: blocksize ", blocksize, " under 32");
    const at::Tensor& c = k_caches_[0];
    TORCH_CHECK(c.dim() == 4, "DecodeStack: the caches must be [slots, kv_heads, positions, head_dim]");
    KV_ = c.size(1), D_ = c.size(3), hidden_ = K_[0], I_ = N_[4];
    TORCH_CHECK(H_ > 0 && H_ % KV_ == 0 && D_ % 2 == 0, "DecodeStack: ", H_, " heads over ", KV_, " kv heads of ", D_);
    const int64_t want[kWeights][2] = {{H_ * D_, hidden_}, {KV_ * D_, hidden_}, {KV_ * D_, hidden_}, {hidden_, H_ * D_},
                                       {I_, hidden_},      {I_, hidden_},      {hidden_, I_}};
    for (int64_t l = 0; l < L_; ++l) {
      for (int j = 0; j < kWeights; ++j) {
        const size_t i = l * kWeights + j;
        TORCH_CHECK(N_[i] == want[j][0] && K_[i] == want[j][1] && K_[i] % blocksize == 0, "DecodeStack: layer ", l,
                    " weight ", j, " is ", N_[i], " x ", K_[i], ", expected ", want[j][0], " x ", want[j][1],
                    " with rows of whole ", blocksize, "-blocks");
        // Checks the tensors' dtypes and sizes once (run() builds the same view again).
        qkernels_nf4::view_of(packed_[i], absmax_[i], nested_absmax_[i], quant_map_[i], nested_map_[i], offset_[i],
                              nested_blocksize_, N_[i], K_[i], nullptr);
        if (bias_[i].has_value())
          TORCH_CHECK(bias_[i]->scalar_type() == at::kFloat && bias_[i]->is_contiguous() && bias_[i]->numel() == N_[i],
                      "DecodeStack: layer ", l, " weight ", j, ": bias must be contiguous float32 [", N_[i], "]");
      }
      for (const at::Tensor* t : {&k_caches_[l], &v_caches_[l]})
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->sizes() == c.sizes(),
                    "DecodeStack: layer ", l, ": the caches must be contiguous float32 ", c.sizes());
    }
    for (const at::Tensor& w : norms_)
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 1 && w.size(0) == hidden_,
                  "DecodeStack: the norms must be contiguous float32 [", hidden_, "]");
    TORCH_CHECK(rope_table_.scalar_type() == at::kFloat && rope_table_.is_contiguous() && rope_table_.dim() == 2 &&
                    rope_table_.size(1) == D_,
                "DecodeStack: rope_table must be contiguous float32 [positions, ", D_, "]");
    // Rows per task: about grain_weights weights, in whole 32-row groups (act's permuted layout).
    for (int64_t K : {hidden_, H_ * D_, I_}) rows_per_task_.push_back(std::max<int64_t>(32, grain_weights / K / 32 * 32));
  }

  // The hidden states [B, hidden] after the last layer's following norm; x [B, hidden] is the residual
  // stream, updated in place; rows: the cache slot of each row; positions: where its token goes.
  at::Tensor run(at::Tensor x, at::Tensor rows, at::Tensor positions, int64_t kv_len) {
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(1) == hidden_ &&
                    x.size(0) > 0,
                "DecodeStack.run: x must be contiguous float32 [B, ", hidden_, "]");
    const int64_t B = x.size(0), slots = k_caches_[0].size(0), S = k_caches_[0].size(2);
    qkernels_decode::check_rows_positions(rows, positions, B, slots, S, rope_table_.size(0));
    const int64_t* rp = rows.data_ptr<int64_t>();
    const int64_t* pp = positions.data_ptr<int64_t>();
    const int64_t span = std::min(S, std::max<int64_t>(kv_len, 1));
    const int64_t HD = H_ * D_, KVD = KV_ * D_;

    // The step's activations, shared by the threads: each written in one phase, read in later ones.
    std::vector<float> buf(B * (4 * hidden_ + 3 * HD + 2 * KVD + 3 * I_));
    float* next = buf.data();
    auto take = [&](int64_t n) { float* p = next; next += B * n; return p; };
    float *h_perm = take(hidden_), *h = take(hidden_), *q = take(HD), *k = take(KVD), *v = take(KVD);
    float *y = take(HD), *y_perm = take(HD), *o = take(hidden_), *gate = take(I_), *up = take(I_);
    float *act_perm = take(I_), *down = take(hidden_);
    std::vector<WeightView> views;
    float* outputs[kWeights] = {q, k, v, o, gate, up, down};
    for (size_t i = 0; i < packed_.size(); ++i)
      views.push_back(qkernels_nf4::view_of(packed_[i], absmax_[i], nested_absmax_[i], quant_map_[i], nested_map_[i],
                                            offset_[i], nested_blocksize_, N_[i], K_[i], outputs[i % kWeights]));
    at::Tensor out = at::empty({B, hidden_}, x.options());
    float *xp = x.data_ptr<float>(), *outp = out.data_ptr<float>();
    const float* rope = rope_table_.data_ptr<float>();

    // Rows [r0, r1) of weight i from the permuted input, plus its bias.
    auto rows_of = [&](size_t i, const float* in, int64_t r0, int64_t r1) {
      qkernels_nf4::weight_rows512(in, B, K_[i], views[i], bshift_, r0, r1);
      if (bias_[i].has_value()) {
        const float* bp = bias_[i]->data_ptr<float>();
        for (int64_t m = 0; m < B; ++m)
          for (int64_t r = r0; r < r1; ++r) views[i].y[m * N_[i] + r] += bp[r];
      }
    };
    auto tasks_of = [&](int64_t N, int64_t per) { return (N + per - 1) / per; };
    const int64_t per_qkv = rows_per_task_[0], per_o = rows_per_task_[1], per_down = rows_per_task_[2];
    const int64_t n_phases = L_ * kPhases;
    std::unique_ptr<PhaseState[]> phases(new PhaseState[n_phases]);
    for (int64_t l = 0; l < L_; ++l) {
      phases[l * kPhases + kQKV].tasks = tasks_of(HD + 2 * KVD, per_qkv);
      phases[l * kPhases + kAttention].tasks = B * H_;
      phases[l * kPhases + kO].tasks = tasks_of(hidden_, per_o);
      phases[l * kPhases + kGateUp].tasks = tasks_of(I_, per_qkv);
      phases[l * kPhases + kDown].tasks = tasks_of(hidden_, per_down);
    }

    auto task = [&](int64_t l, int phase, int64_t t) {
      const size_t w0 = l * kWeights;
      if (phase == kQKV) {  // rows [r0, r1) of q | k | v
        const int64_t r0 = t * per_qkv, r1 = std::min(HD + 2 * KVD, r0 + per_qkv);
        for (int64_t j = 0, first = 0; j < 3; first += N_[w0 + j], ++j) {
          const int64_t a = std::max(r0, first), b = std::min(r1, first + N_[w0 + j]);
          if (a < b) rows_of(w0 + j, h_perm, a - first, b - first);
        }
      } else if (phase == kAttention) {  // one (row, head)
        thread_local std::vector<float> scratch;
        scratch.resize(std::max<size_t>(scratch.size(), D_ + span));
        const int64_t b = t / H_, g = (t % H_) / (H_ / KV_), cache = (rp[b] * KV_ + g) * S * D_;
        qkernels_decode::attend(q + t * D_, rope, k_caches_[l].data_ptr<float>() + cache,
                                v_caches_[l].data_ptr<float>() + cache, pp[b], span, windows_[l], D_, scratch.data(),
                                scratch.data() + D_, y + t * D_);
      } else if (phase == kO) {
        rows_of(w0 + 3, y_perm, t * per_o, std::min(hidden_, (t + 1) * per_o));
      } else if (phase == kGateUp) {  // rows [r0, r1) of gate and of up, then act's columns [r0, r1)
        const int64_t r0 = t * per_qkv, r1 = std::min(I_, r0 + per_qkv);
        rows_of(w0 + 4, h_perm, r0, r1);
        rows_of(w0 + 5, h_perm, r0, r1);
        const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        const __m512i odds = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        for (int64_t m = 0; m < B; ++m)
          for (int64_t r = r0; r < r1; r += 32) {
            const int64_t at = m * I_ + r;
            const __m512 a0 = silu_mul16(_mm512_loadu_ps(gate + at), _mm512_loadu_ps(up + at));
            const __m512 a1 = silu_mul16(_mm512_loadu_ps(gate + at + 16), _mm512_loadu_ps(up + at + 16));
            _mm512_storeu_ps(act_perm + at, _mm512_permutex2var_ps(a0, evens, a1));
            _mm512_storeu_ps(act_perm + at + 16, _mm512_permutex2var_ps(a0, odds, a1));
          }
      } else {
        rows_of(w0 + 6, act_perm, t * per_down, std::min(hidden_, (t + 1) * per_down));
      }
    };
    auto epilogue = [&](int64_t l, int phase) {
      if (phase == kQKV) {
        qkernels_decode::write_kv(k, v, rope, B, KV_, S, D_, rp, pp, k_caches_[l].data_ptr<float>(),
                                  v_caches_[l].data_ptr<float>());
      } else if (phase == kAttention) {
        qkernels_nf4::permute_pairs512(y, B * HD, y_perm);
      } else if (phase == kO) {
        qkernels_decode::add_rms_norm_rows(xp, o, norms_[1 + 2 * l].data_ptr<float>(), B, hidden_, eps_, h);
        qkernels_nf4::permute_pairs512(h, B * hidden_, h_perm);
      } else if (phase == kDown) {
        const bool last = l == L_ - 1;
        qkernels_decode::add_rms_norm_rows(xp, down, norms_[2 + 2 * l].data_ptr<float>(), B, hidden_, eps_,
                                           last ? outp : h);
        if (!last) qkernels_nf4::permute_pairs512(h, B * hidden_, h_perm);
      }
    };

    qkernels_decode::add_rms_norm_rows(xp, nullptr, norms_[0].data_ptr<float>(), B, hidden_, eps_, h);
    qkernels_nf4::permute_pairs512(h, B * hidden_, h_perm);
    alignas(64) std::atomic<int64_t> current{0};
    auto participate = [&]() {
      for (;;) {
        const int64_t c = current.load(std::memory_order_acquire);
        if (c == n_phases) return;
        PhaseState& ph = phases[c];
        const int64_t t = ph.claimed.v.fetch_add(1, std::memory_order_relaxed);
        if (t >= ph.tasks) {
          wait_while_equal(current, c);
          continue;
        }
        task(c / kPhases, static_cast<int>(c % kPhases), t);
        if (ph.done.v.fetch_add(1, std::memory_order_acq_rel) == ph.tasks - 1) {
          epilogue(c / kPhases, static_cast<int>(c % kPhases));
          current.store(c + 1, std::memory_order_release);
        }
      }
    };
    // One task per thread id: each call joins the step once, however torch splits the range (in a
    // parallel region already, one call does the whole step).
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) { participate(); });
    return out;
  }

 private:
  std::vector<at::Tensor> packed_, absmax_, quant_map_;
  std::vector<std::optional<at::Tensor>> nested_absmax_, nested_map_, bias_;
  std::vector<double> offset_;
  std::vector<int64_t> N_, K_;
  std::vector<at::Tensor> norms_, k_caches_, v_caches_;
  std::vector<int64_t> windows_;
  at::Tensor rope_table_;
  int64_t L_ = 0, H_, KV_ = 0, D_ = 0, hidden_ = 0, I_ = 0;
  float eps_;
  int64_t nested_blocksize_;
  int bshift_ = 0;
  std::vector<int64_t> rows_per_task_;  // for K = hidden, heads * head_dim, intermediate
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<std::vector<at::Tensor>, std::vector<at::Tensor>, c10::List<std::optional<at::Tensor>>,
                       std::vector<at::Tensor>, c10::List<std::optional<at::Tensor>>, std::vector<double>,
                       c10::List<std::optional<at::Tensor>>, std::vector<int64_t>, int64_t, int64_t,
                       std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                       std::vector<int64_t>, at::Tensor, int64_t, double, int64_t>())
      .def("run", &DecodeStack::run);
}
#endif
