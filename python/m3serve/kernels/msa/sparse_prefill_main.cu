// KV-block-major sparse prefill, main kernel, CUDA for Hopper (sm_90a): wgmma + cp.async.
//
// Same contract as _block_major_kernel in sparse_prefill_triton.py (the readable form of the
// algorithm; reference.py has the torch reference): one CTA per work item of the inverse index
// (KV head g, global block gb, ≤ ITEM_Q (query, slot) entries); the block's K and V are loaded
// once into shared memory; the item's entries are walked in 64-row tiles (64 / GP queries × GP
// heads), each a complete one-block softmax written as a bf16 unnormalised partial O and an fp32
// (log2-sum-exp, row max) pair.
//
// What it does that the Triton kernel does not (its TTGIR waits on every wgmma at once and routes
// layouts through shared memory with CTA barriers, sparse_prefill.md, sessions 12-13):
//   * S(i) = Q(i)·Kᵀ and O(i-1) = P(i-1)·V are issued together, so the softmax of tile i runs
//     while O(i-1) is on the tensor cores; no wgmma is in flight across the loop's back edge
//     (ptxas would serialise every wgmma: C7515);
//   * P stays in registers: the S accumulator fragment is the A fragment of the P·V wgmma;
//   * query rows are gathered with cp.async straight into the 128-byte-swizzled layout wgmma
//     reads, two tiles ahead (three buffers);
//   * O (unnormalised; its row max and lse beside it) is staged per warp with stmatrix in a
//     consumed query buffer and stored 16 bytes a lane.
// One warpgroup (128 threads) per CTA, 112.75 KB shared memory at ITEM_Q 64: two CTAs per SM.
// At GP 16 (M3's group) a warp's 16 rows are one query's heads: the row bookkeeping is one lookup
// per warp and tile, and each lane's gather / store offsets are computed once (724 SASS
// instructions a warp per tile, from 1117). The default main kernel on Hopper: run() 2.10 vs the
// Triton kernel's 2.36 ms at 32K, 2.19 vs 2.37 at 128K (H200, sparse_prefill.md, session 16).
//
// Shared memory tiles are [rows × 128] bf16 in two 64-column halves, each [rows × 128 B] with
// the 16-byte chunk c of row r stored at chunk c ^ (r % 8) (the 128-byte swizzle).

typedef unsigned int u32;
typedef unsigned long long u64;

// V as the transposed (MN-major) B operand of P·V: leading byte offset = stride between the two
// 64-dim halves, stride byte offset = between groups of 8 keys (H200, session 14: the swapped
// reading gave errors of 0.56, this one 0.002 against the query-major kernel)
#define V_LBO 16384
#define V_SBO 1024

namespace {

#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }

constexpr int D = 128;      // head_dim
constexpr int BN = 128;     // keys per block (= page)
constexpr int BM = 64;      // rows per tile (one wgmma M)
constexpr int Q_TILE = BM * D * 2;  // 16 KB
constexpr int NQB = 3;              // query-row buffers: tile i reads i % 3, i + 2 is in flight
constexpr int KV_TILE = BN * D * 2; // 32 KB

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// byte offset of 16-byte chunk c16 (0..15) of row r in a [rows × 128] bf16 swizzled tile
__device__ __forceinline__ u32 swz(int rows, int r, int c16) {
  return (c16 >> 3) * rows * 128 + r * 128 + (((c16 & 7) ^ (r & 7)) << 4);
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// one 16-byte store (the compiler splits a uint4 store through a cast into four 4-byte ones)
__device__ __forceinline__ void st_global_16(void* p, const uint4& v) {
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(v.x), "r"(v.y),
               "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ u64 desc(u32 saddr, u32 lbo, u32 sbo) {
  return (u64)((saddr & 0x3FFFF) >> 4) | ((u64)(lbo >> 4) << 16) | ((u64)(sbo >> 4) << 32) |
         (1ull << 62);  // 128-byte swizzle
}

__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// keep the compiler from moving reads/writes of wgmma registers across issue/wait
__device__ __forceinline__ void reg_fence(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void reg_fence(u32& x) { asm volatile("" : "+r"(x)::"memory"); }

#define ACC8(i) "+f"(d[i + 0]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define ACC64 ACC8(0), ACC8(8), ACC8(16), ACC8(24), ACC8(32), ACC8(40), ACC8(48), ACC8(56)
#define DREGS                                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, "  \
  "%38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, "  \
  "%56, %57, %58, %59, %60, %61, %62, %63}"

// d[64] (+)= A(smem desc) · B(smem desc), m64n128k16, bf16 in, fp32 accumulate
__device__ __forceinline__ void wgmma_ss(float* d, u64 da, u64 db, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DREGS
      ", %64, %65, p, 1, 1, 0, 0;\n}\n"
      : ACC64
      : "l"(da), "l"(db), "r"(accumulate));
}

// d[64] (+)= A(registers a0..a3) · B(smem desc, transposed: MN-major), m64n128k16
__device__ __forceinline__ void wgmma_rs(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u64 db,
                                         int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 " DREGS
      ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : ACC64
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(db), "r"(accumulate));
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

struct Row {  // one accumulator row of this thread in the current tile
  int ent;    // (query, slot) entry = t * topk + slot
  int head;   // query head
  int lim;    // last visible key column in the block (< 0: nothing visible / padding row)
  bool ok;    // row holds a real (query, head)
};

}  // namespace

template <int GP, int ITEM_Q>
__global__ void __launch_bounds__(128, 2) msa_prefill_main(
    const unsigned short* __restrict__ q, const unsigned short* __restrict__ k_cache,
    const unsigned short* __restrict__ v_cache, unsigned short* __restrict__ o_part,
    float* __restrict__ lse_part, const int* __restrict__ entries, const int* __restrict__ row_ptr,
    const int* __restrict__ item_ptr, const int* __restrict__ work_row,
    const int* __restrict__ work_start, const int* __restrict__ q_pos,
    const int* __restrict__ gb_page, const int* __restrict__ gb_start,
    const int* __restrict__ gb_len, int num_blocks, int n_rows, int group, int topk,
    float sm_scale_log2, long long stride_qt, long long stride_qh, long long stride_kp,
    long long stride_kh, long long stride_kn, long long stride_vp, long long stride_vh,
    long long stride_vn, long long stride_pe, long long stride_ph, long long stride_le,
    long long stride_lh) {
  constexpr int QPT = BM / GP;  // queries per tile
  extern __shared__ __align__(1024) unsigned char smem[];
  // the swizzle pattern repeats every 8 rows of 128 B: tiles must start 1024-byte aligned, and
  // two CTAs per SM leave no room for padding (2 x 112.75 KB + 2 x 1 KB reserved <= 228 KB)
  if (smem_u32(smem) & 1023) __trap();
  unsigned char* ks = smem;
  unsigned char* vs = smem + KV_TILE;
  unsigned char* qs = smem + 2 * KV_TILE;  // NQB query-row buffers
  int* ent_s = reinterpret_cast<int*>(smem + 2 * KV_TILE + NQB * Q_TILE);
  int* t_s = ent_s + ITEM_Q;
  int* pos_s = t_s + ITEM_Q;

  const int w = blockIdx.x;
  if (w >= item_ptr[n_rows]) return;
  const int tid = threadIdx.x;
  const int row = work_row[w];
  const int e0 = work_start[w];
  const int e1 = imin(e0 + ITEM_Q, row_ptr[row + 1]);
  const int g = row / num_blocks;
  const int gb = row - g * num_blocks;
  const long long page = gb_page[gb];
  const int kv0 = gb_start[gb];
  const int kv_len = gb_len[gb];
  const int n_tiles = (e1 - e0 + QPT - 1) / QPT;

  // -- the item's entries, their query index and position --
  for (int i = tid; i < ITEM_Q; i += 128) {
    const bool in = e0 + i < e1;
    const int ent = in ? entries[e0 + i] : 0;
    const int t = ent / topk;
    ent_s[i] = ent;
    t_s[i] = t;
    pos_s[i] = in ? q_pos[t] : -1;
  }
  // -- the KV block, once (keys past a partial last block read as 0) --
  {
    const unsigned short* kb = k_cache + page * stride_kp + g * stride_kh;
    const unsigned short* vb = v_cache + page * stride_vp + g * stride_vh;
#pragma unroll
    for (int j = 0; j < BN * 16 / 128; ++j) {
      const int idx = tid + 128 * j;
      const int r = idx >> 4, c16 = idx & 15;
      const int nbytes = r < kv_len ? 16 : 0;
      const int rr = r < kv_len ? r : 0;
      cp_async16(smem_u32(ks) + swz(BN, r, c16), kb + rr * stride_kn + c16 * 8, nbytes);
      cp_async16(smem_u32(vs) + swz(BN, r, c16), vb + rr * stride_vn + c16 * 8, nbytes);
    }
    cp_async_commit();
  }
  __syncthreads();  // ent_s / t_s / pos_s

  const unsigned short* qg = q + (long long)(g * group) * stride_qh;
  const int warp = tid >> 5, lane = tid & 31;
  // GP == 16 (M3's group, also at TP 4): a warp's 16 rows are one query's 16 heads, so a tile's
  // per-row bookkeeping is one lookup per warp, and the 8 rows x 16-byte chunks a lane moves in
  // the gathers and in the partial stores sit at the same per-lane offsets in every tile:
  // row warp * 16 + hl + 2j, chunk cl (precomputed once, no 64-bit multiply per row); rows
  // j and j + 4 are 8 apart, the same swizzle phase: 1024 bytes apart
  constexpr bool ONE_Q = GP == 16;
  const int hl = lane >> 4, cl = lane & 15;
  u32 rowsw[4];  // swizzled byte offset of (row warp * 16 + hl + 2j, chunk cl) in a Q tile
#pragma unroll
  for (int j = 0; j < 4; ++j) rowsw[j] = swz(BM, warp * 16 + hl + 2 * j, cl);
  const long long q_lane = hl * stride_qh + cl * 8;  // + t * stride_qt + 2j * stride_qh
  const long long o_lane = (long long)(g * group + hl) * stride_ph + cl * 8;  // + ent * stride_pe
  const long long q_step = 2 * stride_qh, o_step = 2 * stride_ph;  // row j -> j + 1
  // the item query of tile row r (rows are query-major, GP heads each; at GP >= 16 a warp's 16
  // rows are one query's heads, so the index is per warp); the gathers and the partial stores
  // both map rows through it
  auto row_query = [&](int tile, int r) {
    return tile * QPT + (GP >= 16 ? warp * 16 / GP : r / GP);
  };
  // each warp gathers its own 16 rows (the rows of its wgmma accumulator fragment), so a warp
  // can reuse its rows of a consumed Q buffer to stage its O stores without a CTA barrier;
  // one cp.async group per call, empty past the last tile, so "all but the newest N groups
  // landed" always means the same tiles
  auto load_q = [&](int tile, int buf) {
    const u32 dst = smem_u32(qs + buf * Q_TILE);
    if (tile >= n_tiles) {
      cp_async_commit();
      return;
    }
    if constexpr (ONE_Q) {
      const int qi = row_query(tile, 0);
      const bool in = pos_s[qi] >= 0;
      const unsigned short* src = qg + (in ? (long long)t_s[qi] * stride_qt + q_lane : 0);
#pragma unroll
      for (int j = 0; j < 8; ++j, src += q_step) {
        const bool ok = in && hl + 2 * j < group;
        cp_async16(dst + rowsw[j & 3] + (j >> 2) * 1024, ok ? src : qg, ok ? 16 : 0);
      }
      cp_async_commit();
      return;
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int idx = lane + 32 * j;
      const int r = warp * 16 + (idx >> 4), c16 = idx & 15;
      const int qi = row_query(tile, r), hi = r % GP;
      const bool ok = pos_s[qi] >= 0 && hi < group;
      const unsigned short* src =
          qg + (ok ? (long long)t_s[qi] * stride_qt + hi * stride_qh : 0) + c16 * 8;
      cp_async16(dst + swz(BM, r, c16), src, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  const int r0 = warp * 16 + (lane >> 2);  // this thread's rows: r0 and r0 + 8
  const int c0 = 2 * (lane & 3);           // its columns: 8j + c0, 8j + c0 + 1
  auto row_info = [&](int tile, int r) {  // r: a row of this warp's 16
    Row x;
    const int qi = row_query(tile, r), hi = r % GP;
    const int pos = pos_s[qi];
    x.ok = pos >= 0 && hi < group;
    x.ent = ent_s[qi];
    x.head = g * group + hi;
    x.lim = x.ok ? imin(pos - kv0, kv_len - 1) : -1;
    return x;
  };

  float s[64];  // S accumulator, then P (fp32) of the tile being softmaxed
  float o[64];  // O accumulator
  u32 p[32];    // P (bf16x2) of the tile whose P·V is in flight

  // descriptors of the tiles' first bytes; a k-step or buffer moves the 16-byte-unit start
  // address field, the low bits of the descriptor (shared offsets < 256 KB: no carry out of it)
  const u64 q_desc = desc(smem_u32(qs), 16, 1024), k_desc = desc(smem_u32(ks), 16, 1024);
  const u64 v_desc = desc(smem_u32(vs), V_LBO, V_SBO);
  auto issue_s = [&](int buf) {
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(s[j]);
    wg_fence();
    const u64 qb = q_desc + (u32)(buf * (Q_TILE >> 4));
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const u32 off = (kk & 3) << 5;  // 16 columns = 32 B into the 128-B row
      const u64 da = qb + (((kk >> 2) * (BM * 128) + off) >> 4);
      const u64 db = k_desc + (((kk >> 2) * (BN * 128) + off) >> 4);
      wgmma_ss(s, da, db, kk > 0);
    }
    wg_commit();
  };
  auto issue_o = [&]() {
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(o[j]);
#pragma unroll
    for (int j = 0; j < 32; ++j) reg_fence(p[j]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const u64 db = v_desc + ((kk * 16 * 128) >> 4);
      wgmma_rs(o, p[4 * kk], p[4 * kk + 1], p[4 * kk + 2], p[4 * kk + 3], db, kk > 0);
    }
    wg_commit();
  };
  // softmax of s (in place, fp32 probabilities) for rows a / b; returns row max and sum
  auto softmax = [&](const Row& a, const Row& b, float& ma, float& mb, float& la, float& lb) {
    // keys past a row's position (its local block) or past a partial last block: −inf; a block
    // wholly visible to both rows (all but the local one) skips the selects
    if (a.lim < BN - 1 || b.lim < BN - 1) {
#pragma unroll
      for (int j = 0; j < 16; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = 8 * j + c0 + e;
          s[4 * j + e] = col <= a.lim ? s[4 * j + e] : NEG_INF;
          s[4 * j + 2 + e] = col <= b.lim ? s[4 * j + 2 + e] : NEG_INF;
        }
      }
    }
    // row max and row sum as 4-way trees (a serial chain of 32 dependent ops per row would
    // stall the two warps a scheduler has)
    float xa[4], xb[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      xa[u] = fmaxf(s[4 * u], s[4 * u + 1]);
      xb[u] = fmaxf(s[4 * u + 2], s[4 * u + 3]);
    }
#pragma unroll
    for (int j = 4; j < 16; ++j) {
      xa[j & 3] = fmaxf(xa[j & 3], fmaxf(s[4 * j], s[4 * j + 1]));
      xb[j & 3] = fmaxf(xb[j & 3], fmaxf(s[4 * j + 2], s[4 * j + 3]));
    }
    ma = fmaxf(fmaxf(xa[0], xa[1]), fmaxf(xa[2], xa[3]));
    mb = fmaxf(fmaxf(xb[0], xb[1]), fmaxf(xb[2], xb[3]));
    ma = fmaxf(ma, __shfl_xor_sync(0xffffffff, ma, 1));
    ma = fmaxf(ma, __shfl_xor_sync(0xffffffff, ma, 2));
    mb = fmaxf(mb, __shfl_xor_sync(0xffffffff, mb, 1));
    mb = fmaxf(mb, __shfl_xor_sync(0xffffffff, mb, 2));
    // scaled row max (log2 units); 0 for a row with nothing visible
    const float sa = ma == NEG_INF ? 0.f : ma * sm_scale_log2;
    const float sb = mb == NEG_INF ? 0.f : mb * sm_scale_log2;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      xa[u] = 0.f;
      xb[u] = 0.f;
    }
#pragma unroll
    for (int j = 0; j < 16; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float x0 = fast_exp2(fmaf(s[4 * j + e], sm_scale_log2, -sa));
        const float x1 = fast_exp2(fmaf(s[4 * j + 2 + e], sm_scale_log2, -sb));
        s[4 * j + e] = x0;
        s[4 * j + 2 + e] = x1;
        xa[(2 * j + e) & 3] += x0;
        xb[(2 * j + e) & 3] += x1;
      }
    }
    la = (xa[0] + xa[1]) + (xa[2] + xa[3]);
    lb = (xb[0] + xb[1]) + (xb[2] + xb[3]);
    la += __shfl_xor_sync(0xffffffff, la, 1);
    la += __shfl_xor_sync(0xffffffff, la, 2);
    lb += __shfl_xor_sync(0xffffffff, lb, 1);
    lb += __shfl_xor_sync(0xffffffff, lb, 2);
    ma = sa;
    mb = sb;
  };
  // (lse = m + log2(l), m) side by side: the combine weights the unnormalised O by 2^m
  auto store_lse = [&](const Row& x, float m, float l) {
    if (x.ok && (lane & 3) == 0)
      *reinterpret_cast<float2*>(lse_part + (long long)x.ent * stride_le + x.head * stride_lh) =
          l > 0.f ? make_float2(m + __log2f(l), m) : make_float2(NEG_INF, NEG_INF);
  };
  // O(tile), unnormalised (the combine divides), staged through this warp's 16 rows of a
  // consumed Q buffer (stmatrix, the accumulator fragment is its input layout), then 16-byte
  // coalesced stores of whole rows
  auto store = [&](int tile, int buf, const Row& xa, const Row& xb, float ma, float la,
                   float mb, float lb) {
    const u32 stage = smem_u32(qs + buf * Q_TILE);
    const int mi = lane >> 3, rr = (lane & 7) + ((mi & 1) << 3);  // matrix, row in the warp
#pragma unroll
    for (int j = 0; j < 16; j += 2) {
      const u32 addr = stage + swz(BM, warp * 16 + rr, j + (mi >> 1));
      const u32 v0 = pack_bf16(o[4 * j], o[4 * j + 1]);
      const u32 v1 = pack_bf16(o[4 * j + 2], o[4 * j + 3]);
      const u32 v2 = pack_bf16(o[4 * j + 4], o[4 * j + 5]);
      const u32 v3 = pack_bf16(o[4 * j + 6], o[4 * j + 7]);
      asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr),
                   "r"(v0), "r"(v1), "r"(v2), "r"(v3)
                   : "memory");
    }
    __syncwarp();
    if constexpr (ONE_Q) {
      const int qi = row_query(tile, 0);
      if (pos_s[qi] >= 0) {
        unsigned short* dst = o_part + (long long)ent_s[qi] * stride_pe + o_lane;
#pragma unroll
        for (int k = 0; k < 8; ++k, dst += o_step) {
          uint4 v;
          asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                       : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                       : "r"(stage + rowsw[k & 3] + (k >> 2) * 1024));
          if (hl + 2 * k < group) st_global_16(dst, v);
        }
      }
      __syncwarp();
      store_lse(xa, ma, la);
      store_lse(xb, mb, lb);
      return;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int r = warp * 16 + 2 * k + (lane >> 4), c16 = lane & 15;
      const Row x = row_info(tile, r);
      uint4 v;
      asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                   : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                   : "r"(stage + swz(BM, r, c16)));
      if (x.ok)
        st_global_16(o_part + (long long)x.ent * stride_pe + (long long)x.head * stride_ph +
                         c16 * 8, v);
    }
    __syncwarp();
    store_lse(xa, ma, la);
    store_lse(xb, mb, lb);
  };

  // -- prologue: Q(0..2) in flight behind the KV block; S(0) and its softmax --
  load_q(0, 0);
  load_q(1, 1);
  load_q(2, 2);
  cp_async_wait<2>();  // the KV block and Q(0)
  fence_proxy_async();
  __syncthreads();
  issue_s(0);
  wg_wait<0>();
#pragma unroll
  for (int j = 0; j < 64; ++j) reg_fence(s[j]);
  Row ca = row_info(0, r0), cb = row_info(0, r0 + 8);
  float ma, mb, la, lb;
  softmax(ca, cb, ma, mb, la, lb);
#pragma unroll
  for (int j = 0; j < 32; ++j) p[j] = pack_bf16(s[2 * j], s[2 * j + 1]);
  // -- tile i: S(i) and O(i-1) = P(i-1)·V issued together; softmax(i) while O(i-1) runs; then
  //    O(i-1)'s partials (staged in tile i-1's buffer), Q(i+2) into that buffer. No wgmma is in
  //    flight across the loop's back edge (ptxas would serialise every wgmma: C7515) --
  int b_prev = 0, b_cur = 1;  // buffers of tiles i-1 and i (tile i+1's is the third)
  for (int i = 1; i < n_tiles; ++i) {
    cp_async_wait<1>();  // Q(i) landed (Q(i+1) may be in flight)
    fence_proxy_async();
    __syncthreads();  // all rows landed; every warp past S(i-1), so b_prev is free
    issue_s(b_cur);
    issue_o();
    wg_wait<1>();  // S(i) done
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(s[j]);
    const Row na = row_info(i, r0), nb = row_info(i, r0 + 8);
    float nma, nmb, nla, nlb;
    softmax(na, nb, nma, nmb, nla, nlb);
    wg_wait<0>();  // O(i-1) done
#pragma unroll
    for (int j = 0; j < 64; ++j) reg_fence(o[j]);
#pragma unroll
    for (int j = 0; j < 32; ++j) reg_fence(p[j]);
    store(i - 1, b_prev, ca, cb, ma, la, mb, lb);
    load_q(i + 2, b_prev);  // each warp its own rows, after its staging reads
#pragma unroll
    for (int j = 0; j < 32; ++j) p[j] = pack_bf16(s[2 * j], s[2 * j + 1]);
    ca = na;
    cb = nb;
    ma = nma;
    mb = nmb;
    la = nla;
    lb = nlb;
    const int b_next = 3 - b_prev - b_cur;
    b_prev = b_cur;
    b_cur = b_next;
  }
  // -- the last tile's P·V and partials (staged in its own buffer: all warps past S(last)) --
  issue_o();
  wg_wait<0>();
#pragma unroll
  for (int j = 0; j < 64; ++j) reg_fence(o[j]);
#pragma unroll
  for (int j = 0; j < 32; ++j) reg_fence(p[j]);
  __syncthreads();
  store(n_tiles - 1, b_prev, ca, cb, ma, la, mb, lb);  // b_prev: 0 if one tile
}

