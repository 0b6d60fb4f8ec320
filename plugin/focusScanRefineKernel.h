// FocusScanRefine CUDA kernels: plain launcher, no TensorRT types.
//
// Computes the operator defined in docs/fsr-op.md (the project's reference definition) for a
// batch of independent rows. The TensorRT glue (focusScanRefinePlugin.cpp) and the ctypes test
// entry points (focusScanRefineHostTest.cu) both call `launchFocusScanRefine`.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace fsr
{
namespace kernels
{

//! Element type of the inputs that are only read as float (features, saliency, relevance).
enum class FloatType : int32_t
{
    kFLOAT32 = 0,
    kFLOAT16 = 1,
};

//! Sizes and attributes of one call. Rows of the batch are independent.
struct FocusScanRefineParams
{
    int32_t batch{0};    //!< B
    int32_t numTokens{0}; //!< N
    int32_t tokenDim{0};  //!< D, width of `tokens` / `pruned`
    int32_t featureDim{0}; //!< F, width of `features`
    int32_t budget{1};    //!< kept tokens per row; K = min(budget, N) (unless keepRatio > 0)
    float alpha{3.0F};
    float beta{1.0F};
    float rho{0.9F};
    float kappa{1.0F};
    float keepRatio{0.0F}; //!< > 0: K = min(N, max(1, floor(keepRatio * N))), budget ignored
};

//! Largest N the kernels accept (one thread block per row keeps 8 tokens per thread at most).
constexpr int32_t kMaxTokens = 8192;

//! keepRatio (a float32 in [2^-25, 1]) as exact integers: keepRatio * 2^48 == hi * 2^24 + lo, with
//! 0 <= hi, lo < 2^24 (smaller ratios give floor(keepRatio * N) = 0 for every N < 2^25, and so does
//! `keptCountFromParts`). Host and device; the plugin's shape expression uses the same integers.
inline __host__ __device__ void keepRatioParts(float keepRatio, int64_t& hi, int64_t& lo)
{
    float const scaled = keepRatio * 16777216.0F; // * 2^24: exact
    float const whole = floorf(scaled);
    hi = static_cast<int64_t>(whole);
    lo = static_cast<int64_t>((scaled - whole) * 16777216.0F); // the fraction, exact
}

//! floor(keepRatio * N) for the exact product, from `keepRatioParts` (integer arithmetic only).
inline __host__ __device__ int64_t keptCountFromParts(int64_t numTokens, int64_t hi, int64_t lo)
{
    return (hi * numTokens + (lo * numTokens) / 16777216) / 16777216;
}

//! K: min(budget, N), or with keepRatio > 0 min(N, max(1, floor(keepRatio * N))) (docs/fsr-op.md;
//! the same integer formula as the ONNX function body and fsr.pruning.fsr_identity.kept_count).
inline __host__ __device__ int32_t keptCount(int32_t budget, float keepRatio, int32_t numTokens)
{
    if (keepRatio > 0.0F)
    {
        int64_t hi = 0;
        int64_t lo = 0;
        keepRatioParts(keepRatio, hi, lo);
        int64_t const k = keptCountFromParts(numTokens, hi, lo);
        return static_cast<int32_t>(k < 1 ? 1 : (k > numTokens ? numTokens : k));
    }
    return budget < numTokens ? budget : numTokens;
}

//! Bytes of device workspace `launchFocusScanRefine` needs for N tokens of which K are kept (0 when
//! K >= N: identity): about 4*B*N*(N + 6), dominated by the fp32 Gram matrix (B*N*N floats).
//! `featureDim` does not change it today. Monotone in B and N, so the size for the largest shapes
//! covers any smaller call whose K is below its N.
size_t focusScanRefineWorkspaceSize(int32_t batch, int32_t numTokens, int32_t featureDim, int32_t keep);

//! Dynamic shared memory (bytes) the per-row selection kernel needs for N tokens; callers may
//! compare it with cudaDevAttrMaxSharedMemoryPerBlockOptin to explain a failure up front.
size_t focusScanRefineSelectSharedBytes(int32_t numTokens);

//! Runs FocusScanRefine on device buffers, asynchronously on `stream`.
//!
//! \param tokens     [B, N, D] T
//! \param features   [B, N, F] featuresType (may alias `tokens` when F == D and types match)
//! \param saliency   [B, N] scoresType
//! \param relevance  [B, N] scoresType, or nullptr when the term is omitted (r_hat = 1)
//! \param pruned     [B, K, D] T, output: kept tokens in ascending original index
//! \param keptIndices [B, K] int64, output: their original indices, ascending
//! \param workspace  device buffer of at least focusScanRefineWorkspaceSize(B, N, F, K) bytes,
//!                   256-byte aligned, K = keptCount(budget, keepRatio, N)
//!
//! \return cudaSuccess, cudaErrorInvalidValue for bad sizes/pointers/attributes/too little
//!         workspace/N above kMaxTokens or above the device's shared memory, or the first launch error.
template <typename T>
cudaError_t launchFocusScanRefine(T const* tokens, void const* features, FloatType featuresType,
    void const* saliency, void const* relevance, FloatType scoresType, T* pruned, int64_t* keptIndices,
    FocusScanRefineParams const& params, void* workspace, size_t workspaceBytes, cudaStream_t stream);

extern template cudaError_t launchFocusScanRefine<float>(float const*, void const*, FloatType, void const*,
    void const*, FloatType, float*, int64_t*, FocusScanRefineParams const&, void*, size_t, cudaStream_t);
extern template cudaError_t launchFocusScanRefine<__half>(__half const*, void const*, FloatType, void const*,
    void const*, FloatType, __half*, int64_t*, FocusScanRefineParams const&, void*, size_t, cudaStream_t);

} // namespace kernels
} // namespace fsr
