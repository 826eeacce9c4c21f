// int4 weight-only GEMV for a few tokens on the tensor cores (mma.sync m16n8k16, float32 accumulators).
// int4_gemv.py puts the #defines in front and compiles it with NVRTC: WARPS, TILES (16-row tiles a block),
// STAGES (a warp's ring of chunks in shared memory), TOKENS (M, at most 8: the MMA's columns), X_BF16,
// SCALE_BF16, BIAS_BF16, GROUP, HAS_ZEROS, HAS_BIAS, GLU_ACT (-1: none; else glu.py's ACTIVATION_CODES).
//
// Contract (quant_linear.py's int4 layout, rows in 64-row tiles): word w of chunk c of a row holds
// k = 128 c + 16 j + w in nibble j; a 64-row tile's rows lie one after another in each chunk, 64 bytes a row.
// A block owns TILES MMA tiles of 16 rows, each two runs of 8 (with GLU_ACT: gate rows and the matching up
// rows), over all of K; its warps take the chunks in turn and add up in shared memory at the end. A warp's
// chunk step, lane (g, c):
// - codes: 16 bytes (words 4c..4c+3) of rows g and g + 8 of each tile, copied (cp.async, no registers held)
//   into the warp's ring STAGES - 1 chunks ahead, the tiles' scales and zero points with them; one lop3
//   (after a shift) turns nibbles j and j + 4 of a word into the 16-bit pair (MAGIC + q_j, MAGIC + q_{j+4}), the
//   MMA's (k, k + 1) register as it stands;
// - activations: copied into the ring with the codes (256 bytes a token a chunk); token g (lanes g < M) reads
//   its 4 values of each of the chunk's 8 nibble planes and pairs planes j and j + 4 with one prmt: the MMA's
//   column g in the same k order;
// - sum (MAGIC + q) x is exact per term; an MMA of ones against the same activations gives the chunk's sum x,
//   so each chunk adds s * (sum - (MAGIC + z) * sum x).

typedef unsigned int u32;
typedef unsigned short u16;

#if X_BF16
#define MAGIC 0x43004300u  // 128.0 in both bf16 halves: OR-ing a nibble into the low mantissa bits gives 128 + q
#define MAGIC_F 128.0f
#define ONES 0x3F803F80u
#define MMA_TYPE "bf16"
#else
#define MAGIC 0x64006400u  // 1024.0 in fp16
#define MAGIC_F 1024.0f
#define ONES 0x3C003C00u
#define MMA_TYPE "f16"
#endif

#define ROW_TILE 64
#define TILE_BYTES 1088  // a tile's chunk in the ring: codes of rows g (512 bytes), g + 8 (512), scales, zeros
#define STAGE_BYTES (TILES * TILE_BYTES + TOKENS * 256)  // ... and the chunk's activations, 256 bytes a token
#define CHUNK_WORDS (ROW_TILE * 16)  // words from one chunk of a 64-row tile to the next
#if GLU_ACT >= 0
#define TILE_ROWS 8  // rows a tile takes from each half
#else
#define TILE_ROWS 16
#endif

__device__ __forceinline__ float to_float(u16 h, bool is_bf16) {
  if (is_bf16) return __uint_as_float(((u32)h) << 16);
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ u16 to_x_dtype(float f) {
  u16 h;
#if X_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
#endif
  return h;
}

__device__ __forceinline__ float round_x_dtype(float f) { return to_float(to_x_dtype(f), X_BF16); }

__device__ __forceinline__ u32 code_pair(u32 word) {  // (word & 0x000F000F) | MAGIC
  u32 out;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(out) : "r"(word), "r"(0x000F000Fu), "r"(MAGIC));
  return out;
}

__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 out;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(out) : "r"(a), "r"(b), "r"(sel));
  return out;
}

__device__ __forceinline__ void mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." MMA_TYPE "." MMA_TYPE ".f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float activate(float v) {
#if GLU_ACT == 0
  return v / (1.0f + expf(-v));
#elif GLU_ACT == 1
  return 0.5f * v * (1.0f + erff(v * 0.7071067811865476f));
#elif GLU_ACT == 2
  return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
#elif GLU_ACT == 3
  return fmaxf(v, 0.0f);
#else
  float r = fmaxf(v, 0.0f);
  return r * r;
#endif
}

__device__ __forceinline__ const u32* run_codes(const u32* qw, int row, int stride_wn) {
  return qw + (size_t)(row / ROW_TILE) * ROW_TILE * stride_wn + (row % ROW_TILE) * 16;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) int4_gemv_mma(
    const u16* __restrict__ x, const u32* __restrict__ qw, const u16* __restrict__ scales,
    const u16* __restrict__ zeros, const u16* __restrict__ bias, u16* __restrict__ y,
    int N, int K, int sxm, int sym, int stride_wn, int stride_sg, int chunks) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, c = lane & 3;
  const int tile0 = blockIdx.x * TILES;  // N is a multiple of 64 and TILES divides 4: no block is partial
  // Rows g and g + 8 of tile t are rows0 + TILE_ROWS t and rows1 + TILE_ROWS t, in the same 64-row tile.
#if GLU_ACT >= 0
  const int rows0 = 8 * tile0 + g, rows1 = N / 2 + 8 * tile0 + g;
#else
  const int rows0 = 16 * tile0 + g, rows1 = 16 * tile0 + 8 + g;
#endif
  const int n_mine = (chunks - warp + WARPS - 1) / WARPS;  // this warp's chunks: warp, warp + WARPS, ...
  extern __shared__ __align__(16) unsigned char ring_all[];  // [WARPS][STAGES][STAGE_BYTES], then red
  unsigned char* ring = ring_all + warp * STAGES * STAGE_BYTES;
  float (*red)[TILES * 16][8] = (float (*)[TILES * 16][8])(ring_all + WARPS * STAGES * STAGE_BYTES);
  // This lane's 16 bytes of rows g and g + 8 of tile 0, chunk 0 of the warp; tile t is TILE_ROWS rows on.
  const unsigned char* src0 = (const unsigned char*)(run_codes(qw, rows0, stride_wn) + (size_t)warp * CHUNK_WORDS)
                              + 16 * c;
  const unsigned char* src1 = (const unsigned char*)(run_codes(qw, rows1, stride_wn) + (size_t)warp * CHUNK_WORDS)
                              + 16 * c;
  // Lanes 0 .. 4 TILES - 1 copy the tiles' scales and zero points: 8 rows (16 bytes) of run (lane & 1).
  const int q_tile = lane >> 2, q_run = lane & 1, q_zero = (lane >> 1) & 1;
  const bool q_lane = lane < 4 * TILES && (HAS_ZEROS || !q_zero);
  const u16* q_src = (q_zero ? zeros : scales) + (q_run ? rows1 : rows0) - g + TILE_ROWS * q_tile;
  const int q_dst = q_tile * TILE_BYTES + 1024 + 16 * (2 * q_zero + q_run);

  auto issue = [&](int i) {  // chunk i of this warp into stage i % STAGES; one commit group a call
    if (i < n_mine) {
      unsigned char* stage = ring + (i % STAGES) * STAGE_BYTES;
      const int k0 = (warp + i * WARPS) * 128;
#pragma unroll
      for (int piece = lane; piece < TOKENS * 16; piece += 32) {  // 16 bytes of a token's chunk; 0 past K
        const int k = k0 + (piece & 15) * 8;
        const u32 dst = (u32)__cvta_generic_to_shared(stage + TILES * TILE_BYTES + piece * 16);
        const u32 bytes = k >= K ? 0u : (K - k >= 8 ? 16u : 2u * (K - k));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                     :: "r"(dst), "l"(x + (size_t)(piece >> 4) * sxm + (bytes ? k : 0)), "r"(bytes) : "memory");
      }
      const size_t step = (size_t)i * WARPS * CHUNK_WORDS * 4;
#pragma unroll
      for (int t = 0; t < TILES; ++t) {
        const u32 dst = (u32)__cvta_generic_to_shared(stage + t * TILE_BYTES + g * 64 + 16 * c);
        const size_t at = step + t * TILE_ROWS * 64;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src0 + at) : "memory");
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst + 512), "l"(src1 + at) : "memory");
      }
      if (q_lane) {
        const int grp = (warp + i * WARPS) * 128 / GROUP;
        const u32 dst = (u32)__cvta_generic_to_shared(stage + q_dst);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(q_src + (size_t)grp * stride_sg)
                     : "memory");
      }
    }
    asm volatile("cp.async.commit_group;" ::: "memory");
  };
#pragma unroll
  for (int i = 0; i < STAGES - 1; ++i) issue(i);

  float acc[TILES][4] = {};  // rows g, g + 8 of each tile; tokens 2c, 2c + 1

  for (int i = 0; i < n_mine; ++i) {
    asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2) : "memory");  // chunk i has landed
    __syncwarp();  // ... for every lane (the scales and activations were copied by a few)
    const unsigned char* stage = ring + (i % STAGES) * STAGE_BYTES;
    uint2 planes[8];  // token g's values of the chunk's 8 nibble planes, words 4c..4c+3 (lanes g >= M: 0)
#pragma unroll
    for (int j = 0; j < 8; ++j)
      planes[j] = g < TOKENS ? *(const uint2*)(stage + TILES * TILE_BYTES + g * 256 + 32 * j + 8 * c)
                             : make_uint2(0u, 0u);
    u32 b[4][4];  // word w: planes 0|4, 1|5, 2|6, 3|7
#pragma unroll
    for (int w = 0; w < 4; ++w)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        b[w][j] = prmt(w < 2 ? planes[j].x : planes[j].y, w < 2 ? planes[j + 4].x : planes[j + 4].y,
                       (w & 1) ? 0x7632u : 0x5410u);
    float x_sum[4] = {};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      mma(x_sum, ONES, ONES, ONES, ONES, b[w][0], b[w][1]);
      mma(x_sum, ONES, ONES, ONES, ONES, b[w][2], b[w][3]);
    }

    uint4 wa[TILES], wb[TILES];
    float s0[TILES], s1[TILES], o0[TILES], o1[TILES];
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
      const unsigned char* tile = stage + t * TILE_BYTES;
      wa[t] = *(const uint4*)(tile + g * 64 + 16 * c);
      wb[t] = *(const uint4*)(tile + 512 + g * 64 + 16 * c);
      const u16* q = (const u16*)(tile + 1024);
      s0[t] = to_float(q[g], SCALE_BF16);
      s1[t] = to_float(q[8 + g], SCALE_BF16);
      o0[t] = MAGIC_F + (HAS_ZEROS ? to_float(q[16 + g], SCALE_BF16) : 8.0f);
      o1[t] = MAGIC_F + (HAS_ZEROS ? to_float(q[24 + g], SCALE_BF16) : 8.0f);
    }
    issue(i + STAGES - 1);  // into stage (i - 1) % STAGES, which every lane read before the __syncwarp
#pragma unroll
    for (int t = 0; t < TILES; ++t) {
      const u32 ca[4] = {wa[t].x, wa[t].y, wa[t].z, wa[t].w}, cb[4] = {wb[t].x, wb[t].y, wb[t].z, wb[t].w};
      float part[2][4] = {};  // two MMA chains
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        mma(part[w & 1], code_pair(ca[w]), code_pair(cb[w]), code_pair(ca[w] >> 4), code_pair(cb[w] >> 4),
            b[w][0], b[w][1]);
        mma(part[w & 1], code_pair(ca[w] >> 8), code_pair(cb[w] >> 8), code_pair(ca[w] >> 12),
            code_pair(cb[w] >> 12), b[w][2], b[w][3]);
      }
      acc[t][0] += s0[t] * ((part[0][0] + part[1][0]) - o0[t] * x_sum[0]);
      acc[t][1] += s0[t] * ((part[0][1] + part[1][1]) - o0[t] * x_sum[1]);
      acc[t][2] += s1[t] * ((part[0][2] + part[1][2]) - o1[t] * x_sum[2]);
      acc[t][3] += s1[t] * ((part[0][3] + part[1][3]) - o1[t] * x_sum[3]);
    }
  }

#pragma unroll
  for (int t = 0; t < TILES; ++t) {
    red[warp][16 * t + g][2 * c] = acc[t][0];
    red[warp][16 * t + g][2 * c + 1] = acc[t][1];
    red[warp][16 * t + g + 8][2 * c] = acc[t][2];
    red[warp][16 * t + g + 8][2 * c + 1] = acc[t][3];
  }
  __syncthreads();
#if GLU_ACT >= 0
  const int half = N / 2;
  for (int idx = threadIdx.x; idx < TILES * 8 * TOKENS; idx += WARPS * 32) {
    const int t = idx / (8 * TOKENS), r = idx / TOKENS % 8, tok = idx % TOKENS, out = 8 * (tile0 + t) + r;
    float gate = 0.0f, up = 0.0f;
    for (int w = 0; w < WARPS; ++w) {
      gate += red[w][16 * t + r][tok];
      up += red[w][16 * t + r + 8][tok];
    }
    if (HAS_BIAS) {
      gate += to_float(bias[out], BIAS_BF16);
      up += to_float(bias[half + out], BIAS_BF16);
    }
    const float act = round_x_dtype(activate(round_x_dtype(gate)));
    y[(size_t)tok * sym + out] = to_x_dtype(act * round_x_dtype(up));
  }
#else
  for (int idx = threadIdx.x; idx < TILES * 16 * TOKENS; idx += WARPS * 32) {
    const int t = idx / (16 * TOKENS), r = idx / TOKENS % 16, tok = idx % TOKENS, row = 16 * (tile0 + t) + r;
    float total = 0.0f;
    for (int w = 0; w < WARPS; ++w) total += red[w][16 * t + r][tok];
    if (HAS_BIAS) total += to_float(bias[row], BIAS_BF16);
    y[(size_t)tok * sym + row] = to_x_dtype(total);
  }
#endif
}
