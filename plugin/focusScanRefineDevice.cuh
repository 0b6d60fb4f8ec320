// Device code of FocusScanRefine (internal; included by focusScanRefineKernel.cu only).
//
// Four kernels per call, all rows of the batch at once:
//   1. gramKernel           G = f f^T per row, fp32, raw features      (64x64 tiles, whole GPU)
//      squaredNormKernel    n_i = f_i . f_i, sequential, not fused     (one thread per token)
//   2. selectKernel<ITEMS>  scores, focus, scan, refine assignment,    (one block per row)
//                           output order
//   3. mergeKernel<T>       kept rows: copy, or phi-weighted merge of  (one block per kept token)
//                           an anchor and its D_top tokens
//
// Numerical conventions: shared/docs/fsr-op.md plus pruning/README.md ("Numerical conventions"),
// which fix float32 rounding so that every implementation takes the same decisions bit for bit:
//   * scores in fp32; powers as product chains (integer exponents 0..16) or x^n * sqrt(x) (n + 0.5),
//     powf otherwise; ties everywhere go to the lower original index, implemented with 64-bit keys
//     (order-preserving float bits in the high word, index in the low word);
//   * K_F from one thread's sequential fp32 prefix sums in sorted order;
//   * cos[i][j] = G[i][j] / sqrt(n_i * n_j), 0 where that denominator is 0, exactly 1 for duplicate
//     rows (G[i][j] == G[j][j] and n_i == n_j), with G the Gram matrix of the fp32 features (each
//     element one fmaf chain over k in increasing order, so identical rows give identical entries)
//     and n_i = f_i . f_i summed one rounded square at a time in k order (no FMA), as every other
//     implementation computes it;
//   * a merged anchor is (phi_j t_j + sum_i phi_i t_i) / (phi_j + sum_i phi_i), anchor first, then
//     members in ascending index, each product and sum rounded separately (no FMA contraction).
// Needs IEEE division and sqrt: never build with --use_fast_math / -prec-div=false / -prec-sqrt=false.
//
// Every block size used here is a multiple of 32 (full warps).
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>

namespace fsr
{
namespace kernels
{
namespace detail
{

constexpr int32_t kWarp = 32;
constexpr uint32_t kFullMask = 0xffffffffU;

// Token classes after the scan.
constexpr uint8_t kClsDiscarded = 0;
constexpr uint8_t kClsFocus = 1;
constexpr uint8_t kClsAnchor = 2;

// Gram tiles.
constexpr int32_t kGramTile = 64;
constexpr int32_t kGramTileK = 16;
constexpr int32_t kGramThreads = 256;
constexpr int32_t kGramPad = 4; // shared-memory row padding

// Merge: one block per kept token.
constexpr int32_t kMergeThreads = 256;

// Per-row bookkeeping written by selectKernel (rowInfo[b * kRowInfoInts + ...]).
constexpr int32_t kRowInfoInts = 4; // K_F, |S|, M, K

// Scratch at the start of selectKernel's dynamic shared memory (before the sort keys).
constexpr int32_t kSelectScratchFloats = 4 * kWarp + 4;
constexpr int32_t kSelectScratchInts = 2 * kWarp + 4;
constexpr int32_t kSelectScratchBytes = (kSelectScratchFloats + kSelectScratchInts) * 4;

struct SelectArgs
{
    void const* saliency;  // [B, N]
    void const* relevance; // [B, N] or nullptr
    int32_t scoresHalf;    // scores are fp16 (else fp32)
    float const* gram;     // [B, N, N], f f^T (not normalised)
    float const* sqNorm;   // [B, N], n_i = f_i . f_i (sequential, not fused)
    float* phi;            // [B, N]
    int32_t* picks;        // [B, N]: scan order, first K used
    int32_t* memberOf;     // [B, N]: group id of each token for the merge (see selectKernel)
    int32_t* keptIdx;      // [B, K]
    int32_t* keptCls;      // [B, K]
    int32_t* rowInfo;      // [B, kRowInfoInts]
    int64_t* keptOut;      // [B, K], the op's second output
    int32_t numTokens;     // N
    int32_t keep;          // K
    int32_t sortSize;      // P = next power of two >= N
    float alpha;
    float beta;
    float rho;
    float kappa;
};

// ---------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float loadAsFloat(void const* p, int32_t isHalf, int64_t i)
{
    return isHalf ? __half2float(static_cast<__half const*>(p)[i]) : static_cast<float const*>(p)[i];
}

template <typename T>
__device__ __forceinline__ float toFloat(T v);

template <>
__device__ __forceinline__ float toFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ float toFloat<__half>(__half v)
{
    return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T fromFloat(float v);

template <>
__device__ __forceinline__ float fromFloat<float>(float v)
{
    return v;
}

template <>
__device__ __forceinline__ __half fromFloat<__half>(float v)
{
    return __float2half_rn(v);
}

//! x^e in fp32 for x >= 0 (pruning/README.md, convention 3): for e = n or n + 0.5 with integer
//! 0 <= n <= 16 the left-to-right product ((x*x)*x)... times sqrtf(x) for the half (x^0 = 1);
//! anything else uses powf, which like every library pow is not correctly rounded.
__device__ __forceinline__ float fsrPow(float x, float e)
{
    float const twice = 2.0F * e;
    if (e >= 0.0F && twice <= 33.0F && twice == floorf(twice))
    {
        int32_t const t = static_cast<int32_t>(twice);
        int32_t const n = t / 2;
        float result = 1.0F;
        bool any = false;
        for (int32_t k = 0; k < n; ++k)
        {
            result = any ? __fmul_rn(result, x) : x;
            any = true;
        }
        if (t % 2 != 0)
        {
            float const root = sqrtf(x);
            result = any ? __fmul_rn(result, root) : root;
        }
        return result;
    }
    return powf(x, e);
}

//! cos(i, j) (pruning/README.md, convention 6): g_ij / sqrt(n_i * n_j), 0 when that denominator is
//! 0, exactly 1 for a duplicate row (g_ij == g_jj, the Gram entry of j with itself, and n_i == n_j).
__device__ __forceinline__ float cosineFromGram(float gij, float gjj, float ni, float nj)
{
    float const denominator = sqrtf(__fmul_rn(ni, nj));
    if (!(denominator > 0.0F))
    {
        return 0.0F;
    }
    return (gij == gjj && ni == nj) ? 1.0F : gij / denominator;
}

//! Order-preserving map of a float to uint32 (ascending); -0 is folded onto +0 so that equal values
//! give equal keys.
__device__ __forceinline__ uint32_t orderedBits(float x)
{
    if (x == 0.0F)
    {
        x = 0.0F;
    }
    uint32_t const u = __float_as_uint(x);
    return (u & 0x80000000U) ? ~u : (u | 0x80000000U);
}

__device__ __forceinline__ float fromOrderedBits(uint32_t o)
{
    uint32_t const u = (o & 0x80000000U) ? (o & 0x7fffffffU) : ~o;
    return __uint_as_float(u);
}

//! Sort key: ascending key order = descending value, ties by ascending index.
__device__ __forceinline__ uint64_t descendingKey(float value, int32_t index)
{
    return (static_cast<uint64_t>(~orderedBits(value)) << 32) | static_cast<uint32_t>(index);
}

__device__ __forceinline__ int32_t keyIndex(uint64_t key)
{
    return static_cast<int32_t>(static_cast<uint32_t>(key & 0xffffffffULL));
}

__device__ __forceinline__ float keyValue(uint64_t key)
{
    return fromOrderedBits(~static_cast<uint32_t>(key >> 32));
}

constexpr uint64_t kLastKey = ~0ULL;

//! (v1, i1) comes before (v2, i2) in "largest value, then lowest index" order.
__device__ __forceinline__ bool isBetter(float v1, int32_t i1, float v2, int32_t i2)
{
    return v1 > v2 || (v1 == v2 && i1 < i2);
}

__device__ __forceinline__ void warpArgmax(float& v, int32_t& i)
{
#pragma unroll
    for (int32_t off = kWarp / 2; off > 0; off >>= 1)
    {
        float const ov = __shfl_xor_sync(kFullMask, v, off);
        int32_t const oi = __shfl_xor_sync(kFullMask, i, off);
        if (isBetter(ov, oi, v, i))
        {
            v = ov;
            i = oi;
        }
    }
}

__device__ __forceinline__ float warpMin(float v)
{
#pragma unroll
    for (int32_t off = kWarp / 2; off > 0; off >>= 1)
    {
        v = fminf(v, __shfl_xor_sync(kFullMask, v, off));
    }
    return v;
}

__device__ __forceinline__ float warpSum(float v)
{
#pragma unroll
    for (int32_t off = kWarp / 2; off > 0; off >>= 1)
    {
        v += __shfl_xor_sync(kFullMask, v, off);
    }
    return v;
}

__device__ __forceinline__ int32_t warpInclusiveScan(int32_t v, int32_t lane)
{
#pragma unroll
    for (int32_t off = 1; off < kWarp; off <<= 1)
    {
        int32_t const o = __shfl_up_sync(kFullMask, v, off);
        if (lane >= off)
        {
            v += o;
        }
    }
    return v;
}

//! Block-wide argmax ("largest value, then lowest index"); every thread gets the winner's index.
//! `scratchV`/`scratchI` hold at least 32 + 1 entries.
__device__ __forceinline__ int32_t blockArgmax(float v, int32_t i, float* scratchV, int32_t* scratchI)
{
    int32_t const lane = threadIdx.x % kWarp;
    int32_t const warp = threadIdx.x / kWarp;
    int32_t const numWarps = blockDim.x / kWarp;
    warpArgmax(v, i);
    if (lane == 0)
    {
        scratchV[warp] = v;
        scratchI[warp] = i;
    }
    __syncthreads();
    if (warp == 0)
    {
        v = lane < numWarps ? scratchV[lane] : -INFINITY;
        i = lane < numWarps ? scratchI[lane] : INT_MAX;
        warpArgmax(v, i);
        if (lane == 0)
        {
            scratchI[kWarp] = i;
        }
    }
    __syncthreads();
    return scratchI[kWarp];
}

//! Block-wide minimum of four values at once; results replace the inputs in every thread.
__device__ __forceinline__ void blockMin4(float (&v)[4], float* scratch)
{
    int32_t const lane = threadIdx.x % kWarp;
    int32_t const warp = threadIdx.x / kWarp;
    int32_t const numWarps = blockDim.x / kWarp;
#pragma unroll
    for (int32_t c = 0; c < 4; ++c)
    {
        v[c] = warpMin(v[c]);
        if (lane == 0)
        {
            scratch[c * kWarp + warp] = v[c];
        }
    }
    __syncthreads();
    if (warp == 0)
    {
#pragma unroll
        for (int32_t c = 0; c < 4; ++c)
        {
            float const w = warpMin(lane < numWarps ? scratch[c * kWarp + lane] : INFINITY);
            if (lane == 0)
            {
                scratch[4 * kWarp + c] = w;
            }
        }
    }
    __syncthreads();
#pragma unroll
    for (int32_t c = 0; c < 4; ++c)
    {
        v[c] = scratch[4 * kWarp + c];
    }
    __syncthreads();
}

//! Exclusive block-wide prefix sum of one int per thread; `total` receives the sum.
__device__ __forceinline__ int32_t blockExclusiveScan(int32_t v, int32_t* scratch, int32_t& total)
{
    int32_t const lane = threadIdx.x % kWarp;
    int32_t const warp = threadIdx.x / kWarp;
    int32_t const numWarps = blockDim.x / kWarp;
    int32_t const inclusive = warpInclusiveScan(v, lane);
    if (lane == kWarp - 1)
    {
        scratch[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0)
    {
        int32_t const w = lane < numWarps ? scratch[lane] : 0;
        int32_t const wIncl = warpInclusiveScan(w, lane);
        if (lane < numWarps)
        {
            scratch[lane] = wIncl - w; // exclusive offset of warp `lane`
        }
        if (lane == kWarp - 1)
        {
            scratch[kWarp] = wIncl;
        }
    }
    __syncthreads();
    int32_t const result = scratch[warp] + inclusive - v;
    total = scratch[kWarp];
    __syncthreads();
    return result;
}

//! Ascending bitonic sort of `size` (a power of two) 64-bit keys in shared memory by the whole
//! block. Starts and ends with a barrier.
__device__ __forceinline__ void blockBitonicSort(uint64_t* keys, int32_t size)
{
    __syncthreads();
    int32_t const half = size / 2;
    for (int32_t k = 2; k <= size; k <<= 1)
    {
        for (int32_t j = k >> 1; j > 0; j >>= 1)
        {
            for (int32_t p = threadIdx.x; p < half; p += blockDim.x)
            {
                // p-th pair of this pass: `lo` has bit j clear, `hi` = lo + j.
                int32_t const lo = 2 * j * (p / j) + (p % j);
                int32_t const hi = lo + j;
                bool const ascending = (lo & k) == 0;
                uint64_t const a = keys[lo];
                uint64_t const b = keys[hi];
                if ((a > b) == ascending)
                {
                    keys[lo] = b;
                    keys[hi] = a;
                }
            }
            __syncthreads();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Gram matrix
// ---------------------------------------------------------------------------------------------

//! gram[b] = f[b] * f[b]^T, N x N, fp32 (features read as fp32). Each element is one fmaf chain
//! over k = 0..F-1 in increasing order, so gram[b][i][j] == gram[b][j][i] exactly and identical
//! rows give identical entries. Grid: (ceil(N/64), ceil(N/64), B).
__global__ void __launch_bounds__(kGramThreads) gramKernel(
    void const* features, int32_t featuresHalf, float* gram, int32_t numTokens, int32_t featureDim)
{
    extern __shared__ __align__(16) unsigned char gramSmem[];
    constexpr int32_t kLd = kGramTile + kGramPad;
    float* tileA = reinterpret_cast<float*>(gramSmem);
    float* tileB = tileA + kGramTileK * kLd;

    int32_t const b = blockIdx.z;
    int32_t const rowBase = blockIdx.y * kGramTile;
    int32_t const colBase = blockIdx.x * kGramTile;
    int32_t const tx = threadIdx.x % 16;
    int32_t const ty = threadIdx.x / 16;
    int64_t const rowsOffset = static_cast<int64_t>(b) * numTokens * featureDim;

    float acc[4][4];
#pragma unroll
    for (int32_t r = 0; r < 4; ++r)
    {
#pragma unroll
        for (int32_t c = 0; c < 4; ++c)
        {
            acc[r][c] = 0.0F;
        }
    }

    for (int32_t k0 = 0; k0 < featureDim; k0 += kGramTileK)
    {
        for (int32_t e = threadIdx.x; e < kGramTile * kGramTileK; e += blockDim.x)
        {
            int32_t const r = e / kGramTileK;
            int32_t const kk = e % kGramTileK;
            int32_t const gk = k0 + kk;
            int32_t const ga = rowBase + r;
            int32_t const gb = colBase + r;
            tileA[kk * kLd + r] = (ga < numTokens && gk < featureDim)
                ? loadAsFloat(features, featuresHalf, rowsOffset + static_cast<int64_t>(ga) * featureDim + gk)
                : 0.0F;
            tileB[kk * kLd + r] = (gb < numTokens && gk < featureDim)
                ? loadAsFloat(features, featuresHalf, rowsOffset + static_cast<int64_t>(gb) * featureDim + gk)
                : 0.0F;
        }
        __syncthreads();
#pragma unroll
        for (int32_t kk = 0; kk < kGramTileK; ++kk)
        {
            float a[4];
            float bv[4];
#pragma unroll
            for (int32_t q = 0; q < 4; ++q)
            {
                a[q] = tileA[kk * kLd + ty * 4 + q];
                bv[q] = tileB[kk * kLd + tx * 4 + q];
            }
#pragma unroll
            for (int32_t r = 0; r < 4; ++r)
            {
#pragma unroll
                for (int32_t c = 0; c < 4; ++c)
                {
                    acc[r][c] = fmaf(a[r], bv[c], acc[r][c]);
                }
            }
        }
        __syncthreads();
    }

    float* out = gram + static_cast<int64_t>(b) * numTokens * numTokens;
#pragma unroll
    for (int32_t r = 0; r < 4; ++r)
    {
        int32_t const row = rowBase + ty * 4 + r;
        if (row >= numTokens)
        {
            continue;
        }
#pragma unroll
        for (int32_t c = 0; c < 4; ++c)
        {
            int32_t const col = colBase + tx * 4 + c;
            if (col < numTokens)
            {
                out[static_cast<int64_t>(row) * numTokens + col] = acc[r][c];
            }
        }
    }
}

//! sqNorm[t] = f_t . f_t for the B*N rows t of the features: each square rounded, then added one
//! at a time in k order (__fmul_rn / __fadd_rn: no contraction), the definition every implementation
//! shares (pruning/README.md, convention 6). One thread per row.
__global__ void squaredNormKernel(
    void const* features, int32_t featuresHalf, float* sqNorm, int64_t rows, int32_t featureDim)
{
    int64_t const t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (t >= rows)
    {
        return;
    }
    int64_t const offset = t * featureDim;
    float acc = 0.0F;
    for (int32_t k = 0; k < featureDim; ++k)
    {
        float const x = loadAsFloat(features, featuresHalf, offset + k);
        acc = __fadd_rn(acc, __fmul_rn(x, x));
    }
    sqNorm[t] = acc;
}

// ---------------------------------------------------------------------------------------------
// 2. Selection: scores, focus, scan, refine assignment, output order (one block per row)
// ---------------------------------------------------------------------------------------------

//! Token i of this block's row is owned by thread i % blockDim.x, item slot i / blockDim.x;
//! requires N <= ITEMS * blockDim.x.
//!
//! memberOf encoding after this kernel (read by mergeKernel):
//!   token i in D_top  -> j*(i), the anchor it is merged into
//!   any other token   -> a negative value
template <int32_t ITEMS>
__global__ void __launch_bounds__(1024) selectKernel(SelectArgs args)
{
    extern __shared__ __align__(16) unsigned char selectSmem[];
    float* scratchF = reinterpret_cast<float*>(selectSmem);
    int32_t* scratchI = reinterpret_cast<int32_t*>(scratchF + kSelectScratchFloats);
    uint64_t* keys = reinterpret_cast<uint64_t*>(selectSmem + kSelectScratchBytes);
    uint8_t* cls = reinterpret_cast<uint8_t*>(keys + args.sortSize);

    int32_t const b = blockIdx.x;
    int32_t const tid = threadIdx.x;
    int32_t const bd = blockDim.x;
    int32_t const n = args.numTokens;
    int32_t const keep = args.keep;
    int32_t const sortSize = args.sortSize;
    int64_t const rowOff = static_cast<int64_t>(b) * n;
    float* phi = args.phi + rowOff;
    int32_t* picks = args.picks + rowOff;
    int32_t* memberOf = args.memberOf + rowOff;
    float const* gram = args.gram + rowOff * n;
    float const* sqNorm = args.sqNorm + rowOff;
    bool const hasRelevance = args.relevance != nullptr;

    // --- 1. norm01 ranges: min and -max of saliency and relevance -------------------------------
    float mm[4] = {INFINITY, INFINITY, INFINITY, INFINITY};
    for (int32_t i = tid; i < n; i += bd)
    {
        float const s = loadAsFloat(args.saliency, args.scoresHalf, rowOff + i);
        mm[0] = fminf(mm[0], s);
        mm[1] = fminf(mm[1], -s);
        if (hasRelevance)
        {
            float const r = loadAsFloat(args.relevance, args.scoresHalf, rowOff + i);
            mm[2] = fminf(mm[2], r);
            mm[3] = fminf(mm[3], -r);
        }
        cls[i] = kClsDiscarded;
    }
    blockMin4(mm, scratchF);
    float const sMin = mm[0];
    float const sSpan = -mm[1] - sMin;
    float const rMin = mm[2];
    float const rSpan = -mm[3] - rMin;

    // --- 2. phi = r_hat^alpha * s_hat^beta (phi = s_hat^beta without relevance), sort keys -----
    for (int32_t i = tid; i < sortSize; i += bd)
    {
        if (i < n)
        {
            float const s = loadAsFloat(args.saliency, args.scoresHalf, rowOff + i);
            float const sHat = (sSpan == 0.0F) ? 1.0F : (s - sMin) / sSpan;
            float p = fsrPow(sHat, args.beta);
            if (hasRelevance)
            {
                float const r = loadAsFloat(args.relevance, args.scoresHalf, rowOff + i);
                float const rHat = (rSpan == 0.0F) ? 1.0F : (r - rMin) / rSpan;
                p = __fmul_rn(fsrPow(rHat, args.alpha), p);
            }
            phi[i] = p;
            keys[i] = descendingKey(p, i);
        }
        else
        {
            keys[i] = kLastKey;
        }
    }
    blockBitonicSort(keys, sortSize);

    // --- 3. K_F: sequential fp32 prefix sums in sorted order (one thread) ----------------------
    if (tid == 0)
    {
        float total = 0.0F;
#pragma unroll 8
        for (int32_t t = 0; t < n; ++t)
        {
            total = __fadd_rn(total, keyValue(keys[t]));
        }
        float const threshold = __fmul_rn(args.rho, total);
        float prefix = 0.0F;
        int32_t below = 0;
#pragma unroll 8
        for (int32_t t = 0; t < n; ++t)
        {
            prefix = __fadd_rn(prefix, keyValue(keys[t]));
            below += (prefix < threshold) ? 1 : 0;
        }
        int32_t kf = 1 + below;
        kf = kf < 1 ? 1 : (kf > keep ? keep : kf);
        scratchI[kWarp + 1] = kf;
    }
    __syncthreads();
    int32_t const numFocus = scratchI[kWarp + 1];
    for (int32_t t = tid; t < numFocus; t += bd)
    {
        int32_t const j = keyIndex(keys[t]);
        picks[t] = j;
        cls[j] = kClsFocus;
    }
    __syncthreads();

    // --- 4. Scan: running min over the taken set of the distance 1 - cos[i][j] ------------------
    float dmin[ITEMS];
    float diag[ITEMS]; // n_i of the owned tokens
    bool taken[ITEMS];
#pragma unroll
    for (int32_t q = 0; q < ITEMS; ++q)
    {
        int32_t const i = tid + q * bd;
        dmin[q] = INFINITY;
        taken[q] = i >= n || cls[i] != kClsDiscarded;
        diag[q] = i < n ? sqNorm[i] : 0.0F;
    }
    // Focus tokens are the first K_F picks; no barrier needed between their updates. Four rows per
    // iteration keep several loads in flight (min is exact, so the order does not matter).
    int32_t t0 = 0;
    for (; t0 + 4 <= numFocus; t0 += 4)
    {
        int32_t j[4];
        float const* g[4];
        float gjj[4];
        float njj[4];
#pragma unroll
        for (int32_t r = 0; r < 4; ++r)
        {
            j[r] = keyIndex(keys[t0 + r]);
            g[r] = gram + static_cast<int64_t>(j[r]) * n;
            gjj[r] = g[r][j[r]];
            njj[r] = sqNorm[j[r]];
        }
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            if (!taken[q])
            {
                int32_t const i = tid + q * bd;
                float c[4];
#pragma unroll
                for (int32_t r = 0; r < 4; ++r)
                {
                    c[r] = g[r][i]; // G[j][i] == G[i][j]
                }
#pragma unroll
                for (int32_t r = 0; r < 4; ++r)
                {
                    dmin[q] = fminf(dmin[q], 1.0F - cosineFromGram(c[r], gjj[r], diag[q], njj[r]));
                }
            }
        }
    }
    for (; t0 < numFocus; ++t0)
    {
        int32_t const j = keyIndex(keys[t0]);
        float const* g = gram + static_cast<int64_t>(j) * n;
        float const gjj = g[j];
        float const njj = sqNorm[j];
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            if (!taken[q])
            {
                dmin[q] = fminf(dmin[q], 1.0F - cosineFromGram(g[tid + q * bd], gjj, diag[q], njj));
            }
        }
    }
    for (int32_t t = numFocus; t < keep; ++t)
    {
        float bestV = -INFINITY;
        int32_t bestI = INT_MAX;
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            int32_t const i = tid + q * bd;
            if (!taken[q] && isBetter(dmin[q], i, bestV, bestI))
            {
                bestV = dmin[q];
                bestI = i;
            }
        }
        int32_t const j = blockArgmax(bestV, bestI, scratchF, scratchI);
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            if (tid + q * bd == j)
            {
                taken[q] = true;
                cls[j] = kClsAnchor;
            }
        }
        if (tid == 0)
        {
            picks[t] = j;
        }
        float const* g = gram + static_cast<int64_t>(j) * n;
        float const gjj = g[j];
        float const njj = sqNorm[j];
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            if (!taken[q])
            {
                dmin[q] = fminf(dmin[q], 1.0F - cosineFromGram(g[tid + q * bd], gjj, diag[q], njj));
            }
        }
    }
    __syncthreads();

    // --- 5. Output order: kept tokens by ascending original index (block prefix sum) -----------
    {
        int32_t const chunk = (n + bd - 1) / bd;
        int32_t const lo = min(n, tid * chunk);
        int32_t const hi = min(n, lo + chunk);
        int32_t count = 0;
        for (int32_t i = lo; i < hi; ++i)
        {
            count += cls[i] != kClsDiscarded ? 1 : 0;
        }
        int32_t total = 0;
        int32_t pos = blockExclusiveScan(count, scratchI, total);
        int64_t const outOff = static_cast<int64_t>(b) * keep;
        for (int32_t i = lo; i < hi; ++i)
        {
            if (cls[i] != kClsDiscarded)
            {
                args.keptIdx[outOff + pos] = i;
                args.keptCls[outOff + pos] = cls[i];
                args.keptOut[outOff + pos] = i;
                ++pos;
            }
        }
    }

    // --- 6. Refine: assignment j*(i), D_top selection ---------------------------------------------
    int32_t const numAnchors = keep - numFocus;
    int32_t numMerged = 0;
#pragma unroll
    for (int32_t q = 0; q < ITEMS; ++q)
    {
        int32_t const i = tid + q * bd;
        if (i < n)
        {
            memberOf[i] = -1;
        }
    }
    if (numAnchors > 0)
    {
        // Anchors' original indices, staged in the (now free) sort-key memory.
        int32_t* anchors = reinterpret_cast<int32_t*>(keys);
        for (int32_t u = tid; u < numAnchors; u += bd)
        {
            anchors[u] = picks[numFocus + u];
        }
        __syncthreads();

        float sim[ITEMS];
        int32_t assign[ITEMS];
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            sim[q] = -INFINITY;
            assign[q] = -1;
        }
        // Largest cos[i][s]; ties -> lower original anchor index (anchors[] is in scan order, not
        // index order, so the tie rule is explicit). NaN never wins. G[s][i] == G[i][s].
        auto consider = [](float c, int32_t s, float& best, int32_t& bestAnchor) {
            if (c == c && (bestAnchor < 0 || c > best || (c == best && s < bestAnchor)))
            {
                best = c;
                bestAnchor = s;
            }
        };
        int32_t u = 0;
        for (; u + 4 <= numAnchors; u += 4) // four rows in flight per iteration
        {
            int32_t s[4];
            float const* g[4];
            float gss[4];
            float nss[4];
#pragma unroll
            for (int32_t r = 0; r < 4; ++r)
            {
                s[r] = anchors[u + r];
                g[r] = gram + static_cast<int64_t>(s[r]) * n;
                gss[r] = g[r][s[r]];
                nss[r] = sqNorm[s[r]];
            }
#pragma unroll
            for (int32_t q = 0; q < ITEMS; ++q)
            {
                if (!taken[q])
                {
                    int32_t const i = tid + q * bd;
                    float c[4];
#pragma unroll
                    for (int32_t r = 0; r < 4; ++r)
                    {
                        c[r] = g[r][i];
                    }
#pragma unroll
                    for (int32_t r = 0; r < 4; ++r)
                    {
                        consider(cosineFromGram(c[r], gss[r], diag[q], nss[r]), s[r], sim[q], assign[q]);
                    }
                }
            }
        }
        for (; u < numAnchors; ++u)
        {
            int32_t const s = anchors[u];
            float const* g = gram + static_cast<int64_t>(s) * n;
            float const gss = g[s];
            float const nss = sqNorm[s];
#pragma unroll
            for (int32_t q = 0; q < ITEMS; ++q)
            {
                if (!taken[q])
                {
                    consider(cosineFromGram(g[tid + q * bd], gss, diag[q], nss), s, sim[q], assign[q]);
                }
            }
        }
        __syncthreads(); // anchors[] no longer needed; keys[] reused below

        for (int32_t i = tid; i < sortSize; i += bd)
        {
            keys[i] = kLastKey;
        }
        __syncthreads();
#pragma unroll
        for (int32_t q = 0; q < ITEMS; ++q)
        {
            int32_t const i = tid + q * bd;
            if (i < n && !taken[q])
            {
                keys[i] = descendingKey(sim[q], i);
                memberOf[i] = -2 - assign[q]; // negative until selected into D_top
            }
        }
        blockBitonicSort(keys, sortSize);

        float const mf = floorf(__fmul_rn(args.kappa, static_cast<float>(numAnchors)));
        int32_t const numDiscarded = n - keep;
        numMerged = !(mf > 0.0F) ? 0
                                 : (mf >= static_cast<float>(numDiscarded) ? numDiscarded : static_cast<int32_t>(mf));
        for (int32_t t = tid; t < numMerged; t += bd)
        {
            int32_t const i = keyIndex(keys[t]);
            memberOf[i] = -2 - memberOf[i]; // -> j*(i) (or -1 if i had no valid anchor)
        }
    }

    if (tid == 0)
    {
        int32_t* info = args.rowInfo + static_cast<int64_t>(b) * kRowInfoInts;
        info[0] = numFocus;
        info[1] = numAnchors;
        info[2] = numMerged;
        info[3] = keep;
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Merge / gather: one block per kept token
// ---------------------------------------------------------------------------------------------

//! pruned[b, k, :] for k = blockIdx.x, b = blockIdx.y. Focus tokens, and anchors without D_top
//! tokens, are copied bit-exact. An anchor j with members {i : memberOf[i] == j} becomes
//! (phi_j t_j + sum_i phi_i t_i) / (phi_j + sum_i phi_i), summed anchor first then members in
//! ascending index, every product and sum rounded on its own (as the PyTorch reference); a zero
//! denominator keeps t_j. Dynamic shared memory: 256 + 8*N bytes.
template <typename T>
__global__ void __launch_bounds__(kMergeThreads) mergeKernel(T const* tokens, float const* phiAll,
    int32_t const* memberOfAll, int32_t const* keptIdx, int32_t const* keptCls, T* pruned, int32_t numTokens,
    int32_t keep, int32_t tokenDim)
{
    extern __shared__ __align__(16) unsigned char mergeSmem[];
    int32_t* scratch = reinterpret_cast<int32_t*>(mergeSmem);         // 64 ints
    int32_t* members = scratch + 64;                                   // N ints
    float* weights = reinterpret_cast<float*>(members + numTokens);    // N floats

    int32_t const k = blockIdx.x;
    int32_t const b = blockIdx.y;
    int32_t const tid = threadIdx.x;
    int32_t const bd = blockDim.x;
    int64_t const slot = static_cast<int64_t>(b) * keep + k;
    int32_t const j = keptIdx[slot];
    T const* rowTokens = tokens + static_cast<int64_t>(b) * numTokens * tokenDim;
    T const* src = rowTokens + static_cast<int64_t>(j) * tokenDim;
    T* dst = pruned + slot * tokenDim;

    int32_t groupSize = 0;
    if (keptCls[slot] == kClsAnchor)
    {
        // Members of anchor j in ascending index order (ballot compaction).
        int32_t const* memberOf = memberOfAll + static_cast<int64_t>(b) * numTokens;
        float const* phi = phiAll + static_cast<int64_t>(b) * numTokens;
        int32_t const lane = tid % kWarp;
        for (int32_t start = 0; start < numTokens; start += bd)
        {
            int32_t const i = start + tid;
            bool const isMember = i < numTokens && memberOf[i] == j;
            uint32_t const ballot = __ballot_sync(kFullMask, isMember);
            int32_t total = 0;
            int32_t const warpOff = blockExclusiveScan(lane == 0 ? __popc(ballot) : 0, scratch, total);
            int32_t const warpBase = __shfl_sync(kFullMask, warpOff, 0);
            if (isMember)
            {
                int32_t const pos = groupSize + warpBase + __popc(ballot & ((1U << lane) - 1U));
                members[pos] = i;
                weights[pos] = phi[i];
            }
            groupSize += total;
        }
        __syncthreads();
        if (groupSize > 0)
        {
            float const phiJ = phi[j];
            float denom = phiJ;
            for (int32_t m = 0; m < groupSize; ++m)
            {
                denom = __fadd_rn(denom, weights[m]);
            }
            if (denom != 0.0F)
            {
                for (int32_t d = tid; d < tokenDim; d += bd)
                {
                    float num = __fmul_rn(phiJ, toFloat(src[d]));
                    for (int32_t m = 0; m < groupSize; ++m)
                    {
                        float const t = toFloat(rowTokens[static_cast<int64_t>(members[m]) * tokenDim + d]);
                        num = __fadd_rn(num, __fmul_rn(weights[m], t));
                    }
                    dst[d] = fromFloat<T>(num / denom);
                }
                return;
            }
        }
    }
    for (int32_t d = tid; d < tokenDim; d += bd)
    {
        dst[d] = src[d];
    }
}

//! Identity case (budget >= N): kept[b, i] = i.
__global__ void iotaKernel(int64_t* kept, int64_t total, int32_t numTokens)
{
    int64_t const e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e < total)
    {
        kept[e] = e % numTokens;
    }
}

} // namespace detail
} // namespace kernels
} // namespace fsr
