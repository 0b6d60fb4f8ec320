// FocusScanRefine launcher: validates sizes, carves the workspace, launches the kernels of
// focusScanRefineDevice.cuh on one stream. No TensorRT header here.
#include "focusScanRefineKernel.h"

#include "focusScanRefineDevice.cuh"

namespace fsr
{
namespace kernels
{
namespace
{

constexpr size_t kAlign = 256;

size_t alignUp(size_t bytes)
{
    return (bytes + kAlign - 1) / kAlign * kAlign;
}

int32_t nextPowerOfTwo(int32_t n)
{
    int32_t p = 1;
    while (p < n)
    {
        p <<= 1;
    }
    return p;
}

//! Device buffers inside the workspace, in this order (each 256-byte aligned).
struct WorkspaceLayout
{
    size_t gram{0};     // B*N*N float
    size_t sqNorm{0};   // B*N float
    size_t phi{0};      // B*N float
    size_t picks{0};    // B*N int32
    size_t memberOf{0}; // B*N int32
    size_t keptIdx{0};  // B*N int32 (B*K used)
    size_t keptCls{0};  // B*N int32 (B*K used)
    size_t rowInfo{0};  // B*4 int32
    size_t total{0};

    WorkspaceLayout(int32_t batch, int32_t numTokens)
    {
        size_t const b = static_cast<size_t>(batch);
        size_t const n = static_cast<size_t>(numTokens);
        size_t offset = 0;
        auto take = [&offset](size_t bytes) {
            size_t const at = offset;
            offset += alignUp(bytes);
            return at;
        };
        gram = take(b * n * n * sizeof(float));
        sqNorm = take(b * n * sizeof(float));
        phi = take(b * n * sizeof(float));
        picks = take(b * n * sizeof(int32_t));
        memberOf = take(b * n * sizeof(int32_t));
        keptIdx = take(b * n * sizeof(int32_t));
        keptCls = take(b * n * sizeof(int32_t));
        rowInfo = take(b * detail::kRowInfoInts * sizeof(int32_t));
        total = offset;
    }
};

template <typename Kernel>
cudaError_t allowDynamicSharedMemory(Kernel kernel, size_t bytes)
{
    constexpr size_t kDefaultLimit = 48 * 1024;
    if (bytes <= kDefaultLimit)
    {
        return cudaSuccess;
    }
    int32_t device = 0;
    cudaError_t status = cudaGetDevice(&device);
    if (status != cudaSuccess)
    {
        return status;
    }
    int32_t optin = 0;
    status = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (status != cudaSuccess)
    {
        return status;
    }
    if (bytes > static_cast<size_t>(optin))
    {
        return cudaErrorInvalidValue;
    }
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int32_t>(bytes));
}

template <int32_t ITEMS>
cudaError_t launchSelect(detail::SelectArgs const& args, int32_t batch, cudaStream_t stream)
{
    int32_t const perThread = (args.numTokens + ITEMS - 1) / ITEMS;
    int32_t threads = (perThread + detail::kWarp - 1) / detail::kWarp * detail::kWarp;
    threads = threads < detail::kWarp ? detail::kWarp : threads;
    size_t const smem = focusScanRefineSelectSharedBytes(args.numTokens);
    cudaError_t const status = allowDynamicSharedMemory(detail::selectKernel<ITEMS>, smem);
    if (status != cudaSuccess)
    {
        return status;
    }
    detail::selectKernel<ITEMS><<<batch, threads, smem, stream>>>(args);
    return cudaGetLastError();
}

} // namespace

size_t focusScanRefineWorkspaceSize(int32_t batch, int32_t numTokens, int32_t /*featureDim*/, int32_t keep)
{
    if (batch <= 0 || numTokens <= 0 || keep >= numTokens)
    {
        return 0;
    }
    return WorkspaceLayout(batch, numTokens).total;
}

size_t focusScanRefineSelectSharedBytes(int32_t numTokens)
{
    size_t const sortSize = static_cast<size_t>(nextPowerOfTwo(numTokens < 1 ? 1 : numTokens));
    return detail::kSelectScratchBytes + sortSize * sizeof(uint64_t) + alignUp(static_cast<size_t>(numTokens));
}

template <typename T>
cudaError_t launchFocusScanRefine(T const* tokens, void const* features, FloatType featuresType,
    void const* saliency, void const* relevance, FloatType scoresType, T* pruned, int64_t* keptIndices,
    FocusScanRefineParams const& params, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    int32_t const batch = params.batch;
    int32_t const n = params.numTokens;
    int32_t const d = params.tokenDim;
    int32_t const f = params.featureDim;
    if (batch < 0 || n < 0 || d < 1 || f < 1 || params.budget < 1 || n > kMaxTokens || batch > 65535
        || !(params.keepRatio >= 0.0F && params.keepRatio <= 1.0F))
    {
        return cudaErrorInvalidValue;
    }
    if (batch == 0 || n == 0)
    {
        return cudaSuccess;
    }
    if (tokens == nullptr || features == nullptr || saliency == nullptr || pruned == nullptr
        || keptIndices == nullptr)
    {
        return cudaErrorInvalidValue;
    }
    int32_t const keep = keptCount(params.budget, params.keepRatio, n);

    // budget >= N: identity (all tokens, indices 0..N-1).
    if (keep == n)
    {
        cudaError_t const status = cudaMemcpyAsync(pruned, tokens,
            static_cast<size_t>(batch) * n * d * sizeof(T), cudaMemcpyDeviceToDevice, stream);
        if (status != cudaSuccess)
        {
            return status;
        }
        int64_t const total = static_cast<int64_t>(batch) * n;
        int32_t const threads = 256;
        detail::iotaKernel<<<static_cast<uint32_t>((total + threads - 1) / threads), threads, 0, stream>>>(
            keptIndices, total, n);
        return cudaGetLastError();
    }

    WorkspaceLayout const layout(batch, n);
    if (workspace == nullptr || workspaceBytes < layout.total)
    {
        return cudaErrorInvalidValue;
    }
    auto* ws = static_cast<unsigned char*>(workspace);
    float* gram = reinterpret_cast<float*>(ws + layout.gram);
    float* sqNorm = reinterpret_cast<float*>(ws + layout.sqNorm);
    float* phi = reinterpret_cast<float*>(ws + layout.phi);
    int32_t* picks = reinterpret_cast<int32_t*>(ws + layout.picks);
    int32_t* memberOf = reinterpret_cast<int32_t*>(ws + layout.memberOf);
    int32_t* keptIdx = reinterpret_cast<int32_t*>(ws + layout.keptIdx);
    int32_t* keptCls = reinterpret_cast<int32_t*>(ws + layout.keptCls);
    int32_t* rowInfo = reinterpret_cast<int32_t*>(ws + layout.rowInfo);

    // 1. Gram matrix of the (fp32) features
    int32_t const tiles = (n + detail::kGramTile - 1) / detail::kGramTile;
    size_t const gramSmem = 2 * detail::kGramTileK * (detail::kGramTile + detail::kGramPad) * sizeof(float);
    detail::gramKernel<<<dim3(tiles, tiles, batch), detail::kGramThreads, gramSmem, stream>>>(
        features, featuresType == FloatType::kFLOAT16 ? 1 : 0, gram, n, f);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess)
    {
        return status;
    }
    int64_t const rows = static_cast<int64_t>(batch) * n;
    detail::squaredNormKernel<<<static_cast<uint32_t>((rows + 255) / 256), 256, 0, stream>>>(
        features, featuresType == FloatType::kFLOAT16 ? 1 : 0, sqNorm, rows, f);
    status = cudaGetLastError();
    if (status != cudaSuccess)
    {
        return status;
    }

    // 2. per-row selection
    detail::SelectArgs args{};
    args.saliency = saliency;
    args.relevance = relevance;
    args.scoresHalf = scoresType == FloatType::kFLOAT16 ? 1 : 0;
    args.gram = gram;
    args.sqNorm = sqNorm;
    args.phi = phi;
    args.picks = picks;
    args.memberOf = memberOf;
    args.keptIdx = keptIdx;
    args.keptCls = keptCls;
    args.rowInfo = rowInfo;
    args.keptOut = keptIndices;
    args.numTokens = n;
    args.keep = keep;
    args.sortSize = nextPowerOfTwo(n);
    args.alpha = params.alpha;
    args.beta = params.beta;
    args.rho = params.rho;
    args.kappa = params.kappa;
    if (n <= 1024)
    {
        status = launchSelect<1>(args, batch, stream);
    }
    else if (n <= 2048)
    {
        status = launchSelect<2>(args, batch, stream);
    }
    else if (n <= 4096)
    {
        status = launchSelect<4>(args, batch, stream);
    }
    else
    {
        status = launchSelect<8>(args, batch, stream);
    }
    if (status != cudaSuccess)
    {
        return status;
    }

    // 3. merge / gather of the kept rows
    size_t const mergeSmemBytes = 64 * sizeof(int32_t) + static_cast<size_t>(n) * (sizeof(int32_t) + sizeof(float));
    status = allowDynamicSharedMemory(detail::mergeKernel<T>, mergeSmemBytes);
    if (status != cudaSuccess)
    {
        return status;
    }
    detail::mergeKernel<T><<<dim3(keep, batch), detail::kMergeThreads, mergeSmemBytes, stream>>>(
        tokens, phi, memberOf, keptIdx, keptCls, pruned, n, keep, d);
    return cudaGetLastError();
}

template cudaError_t launchFocusScanRefine<float>(float const*, void const*, FloatType, void const*, void const*,
    FloatType, float*, int64_t*, FocusScanRefineParams const&, void*, size_t, cudaStream_t);
template cudaError_t launchFocusScanRefine<__half>(__half const*, void const*, FloatType, void const*, void const*,
    FloatType, __half*, int64_t*, FocusScanRefineParams const&, void*, size_t, cudaStream_t);

} // namespace kernels
} // namespace fsr
