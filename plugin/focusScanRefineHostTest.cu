// C ABI over the FocusScanRefine launcher, taking HOST buffers, so that Python (ctypes + NumPy)
// can run and time the kernels without TensorRT. Built into libfsr_kernels_test.so; used by
// tests/test_plugin_kernels.py and plugin/bench_kernel.py. Not part of the TensorRT plugin.
//
// Return codes: 0 on success, otherwise a cudaError_t value (fsr_error_string explains it).
// dtype codes: 0 = float32, 1 = float16.
#include "focusScanRefineKernel.h"

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#define FSR_API extern "C" __attribute__((visibility("default")))

namespace
{

using fsr::kernels::FloatType;
using fsr::kernels::FocusScanRefineParams;

//! Device allocations freed on scope exit.
class DeviceBuffers
{
public:
    ~DeviceBuffers()
    {
        for (void* p : mPointers)
        {
            cudaFree(p);
        }
    }

    cudaError_t alloc(void** out, size_t bytes)
    {
        *out = nullptr;
        if (bytes == 0)
        {
            return cudaSuccess;
        }
        cudaError_t const status = cudaMalloc(out, bytes);
        if (status == cudaSuccess)
        {
            mPointers.push_back(*out);
        }
        return status;
    }

    cudaError_t upload(void** out, void const* host, size_t bytes)
    {
        cudaError_t status = alloc(out, bytes);
        if (status == cudaSuccess && bytes > 0)
        {
            status = cudaMemcpy(*out, host, bytes, cudaMemcpyHostToDevice);
        }
        return status;
    }

private:
    std::vector<void*> mPointers;
};

size_t elementSize(int32_t dtype)
{
    return dtype == 1 ? 2 : 4;
}

FloatType floatType(int32_t dtype)
{
    return dtype == 1 ? FloatType::kFLOAT16 : FloatType::kFLOAT32;
}

cudaError_t launch(int32_t tokensDtype, void const* tokens, void const* features, int32_t featuresDtype,
    void const* saliency, void const* relevance, int32_t scoresDtype, void* pruned, int64_t* kept,
    FocusScanRefineParams const& params, void* workspace, size_t workspaceBytes, cudaStream_t stream)
{
    if (tokensDtype == 1)
    {
        return fsr::kernels::launchFocusScanRefine<__half>(static_cast<__half const*>(tokens), features,
            floatType(featuresDtype), saliency, relevance, floatType(scoresDtype), static_cast<__half*>(pruned),
            kept, params, workspace, workspaceBytes, stream);
    }
    return fsr::kernels::launchFocusScanRefine<float>(static_cast<float const*>(tokens), features,
        floatType(featuresDtype), saliency, relevance, floatType(scoresDtype), static_cast<float*>(pruned), kept,
        params, workspace, workspaceBytes, stream);
}

struct Problem
{
    FocusScanRefineParams params;
    size_t tokensBytes{0};
    size_t featuresBytes{0};
    size_t scoresBytes{0};
    size_t prunedBytes{0};
    size_t keptBytes{0};
};

bool makeProblem(int32_t tokensDtype, int32_t featuresDtype, int32_t scoresDtype, int32_t batch, int32_t numTokens,
    int32_t tokenDim, int32_t featureDim, int32_t budget, float alpha, float beta, float rho, float kappa,
    float keepRatio, Problem& out)
{
    if ((tokensDtype != 0 && tokensDtype != 1) || (featuresDtype != 0 && featuresDtype != 1)
        || (scoresDtype != 0 && scoresDtype != 1))
    {
        return false;
    }
    if (batch < 0 || numTokens < 0 || tokenDim < 1 || featureDim < 1 || budget < 1 || !(keepRatio >= 0.0F)
        || keepRatio > 1.0F)
    {
        return false;
    }
    out.params.batch = batch;
    out.params.numTokens = numTokens;
    out.params.tokenDim = tokenDim;
    out.params.featureDim = featureDim;
    out.params.budget = budget;
    out.params.alpha = alpha;
    out.params.beta = beta;
    out.params.rho = rho;
    out.params.kappa = kappa;
    out.params.keepRatio = keepRatio;
    size_t const b = static_cast<size_t>(batch);
    size_t const n = static_cast<size_t>(numTokens);
    size_t const k = static_cast<size_t>(numTokens > 0 ? fsr::kernels::keptCount(budget, keepRatio, numTokens) : 0);
    out.tokensBytes = b * n * tokenDim * elementSize(tokensDtype);
    out.featuresBytes = b * n * featureDim * elementSize(featuresDtype);
    out.scoresBytes = b * n * elementSize(scoresDtype);
    out.prunedBytes = b * k * tokenDim * elementSize(tokensDtype);
    out.keptBytes = b * k * sizeof(int64_t);
    return true;
}

//! Device copies of one problem's inputs, its output buffers and the workspace.
struct Staged
{
    void* tokens = nullptr;
    void* features = nullptr;
    void* saliency = nullptr;
    void* relevance = nullptr; // stays null when the relevance term is omitted
    void* pruned = nullptr;
    void* kept = nullptr;
    void* workspace = nullptr;
    size_t workspaceBytes = 0;
};

cudaError_t stage(DeviceBuffers& buffers, Problem const& problem, void const* tokens, void const* features,
    void const* saliency, void const* relevance, Staged& d)
{
    FocusScanRefineParams const& p = problem.params;
    int32_t const keep = p.numTokens > 0 ? fsr::kernels::keptCount(p.budget, p.keepRatio, p.numTokens) : 0;
    d.workspaceBytes = fsr::kernels::focusScanRefineWorkspaceSize(p.batch, p.numTokens, p.featureDim, keep);
    cudaError_t status = buffers.upload(&d.tokens, tokens, problem.tokensBytes);
    if (status == cudaSuccess)
        status = buffers.upload(&d.features, features, problem.featuresBytes);
    if (status == cudaSuccess)
        status = buffers.upload(&d.saliency, saliency, problem.scoresBytes);
    if (status == cudaSuccess && relevance != nullptr)
        status = buffers.upload(&d.relevance, relevance, problem.scoresBytes);
    if (status == cudaSuccess)
        status = buffers.alloc(&d.pruned, problem.prunedBytes);
    if (status == cudaSuccess)
        status = buffers.alloc(&d.kept, problem.keptBytes);
    if (status == cudaSuccess)
        status = buffers.alloc(&d.workspace, d.workspaceBytes);
    return status;
}

} // namespace

//! Number of CUDA devices, or -(cudaError_t) when the runtime cannot enumerate them.
FSR_API int32_t fsr_cuda_device_count(void)
{
    int32_t count = 0;
    cudaError_t const status = cudaGetDeviceCount(&count);
    return status == cudaSuccess ? count : -static_cast<int32_t>(status);
}

FSR_API char const* fsr_error_string(int32_t code)
{
    return cudaGetErrorString(static_cast<cudaError_t>(code));
}

FSR_API uint64_t fsr_workspace_size(int32_t batch, int32_t numTokens, int32_t featureDim, int32_t keep)
{
    return fsr::kernels::focusScanRefineWorkspaceSize(batch, numTokens, featureDim, keep);
}

//! K for N tokens (host code: runs without a GPU), the formula the kernels and the plugin use.
FSR_API int32_t fsr_kept_count(int32_t budget, float keepRatio, int32_t numTokens)
{
    return fsr::kernels::keptCount(budget, keepRatio, numTokens);
}

FSR_API int32_t fsr_max_tokens(void)
{
    return fsr::kernels::kMaxTokens;
}

//! One synchronous run. relevance may be NULL (term omitted). Outputs: pruned [B,K,D] in the
//! tokens dtype, kept_indices [B,K] int64, K = fsr_kept_count(budget, keepRatio, N).
FSR_API int32_t fsr_run_host(void const* tokens, int32_t tokensDtype, void const* features, int32_t featuresDtype,
    void const* saliency, void const* relevance, int32_t scoresDtype, void* pruned, int64_t* keptIndices,
    int32_t batch, int32_t numTokens, int32_t tokenDim, int32_t featureDim, int32_t budget, float alpha, float beta,
    float rho, float kappa, float keepRatio)
{
    Problem problem;
    if (!makeProblem(tokensDtype, featuresDtype, scoresDtype, batch, numTokens, tokenDim, featureDim, budget, alpha,
            beta, rho, kappa, keepRatio, problem))
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    DeviceBuffers buffers;
    Staged d;
    cudaError_t status = stage(buffers, problem, tokens, features, saliency, relevance, d);
    if (status == cudaSuccess)
        status = launch(tokensDtype, d.tokens, d.features, featuresDtype, d.saliency, d.relevance, scoresDtype,
            d.pruned, static_cast<int64_t*>(d.kept), problem.params, d.workspace, d.workspaceBytes, nullptr);
    if (status == cudaSuccess)
        status = cudaDeviceSynchronize();
    if (status == cudaSuccess && problem.prunedBytes > 0)
        status = cudaMemcpy(pruned, d.pruned, problem.prunedBytes, cudaMemcpyDeviceToHost);
    if (status == cudaSuccess && problem.keptBytes > 0)
        status = cudaMemcpy(keptIndices, d.kept, problem.keptBytes, cudaMemcpyDeviceToHost);
    return static_cast<int32_t>(status);
}

//! Times `iterations` launches (after `warmup` untimed ones) on device-resident copies of the
//! inputs; timesMs receives one CUDA-event time per iteration (ms). Outputs are not returned.
FSR_API int32_t fsr_bench_host(void const* tokens, int32_t tokensDtype, void const* features, int32_t featuresDtype,
    void const* saliency, void const* relevance, int32_t scoresDtype, int32_t batch, int32_t numTokens,
    int32_t tokenDim, int32_t featureDim, int32_t budget, float alpha, float beta, float rho, float kappa,
    float keepRatio, int32_t warmup, int32_t iterations, float* timesMs)
{
    Problem problem;
    if (iterations < 1 || warmup < 0 || timesMs == nullptr
        || !makeProblem(tokensDtype, featuresDtype, scoresDtype, batch, numTokens, tokenDim, featureDim, budget, alpha,
            beta, rho, kappa, keepRatio, problem))
    {
        return static_cast<int32_t>(cudaErrorInvalidValue);
    }
    DeviceBuffers buffers;
    Staged d;
    cudaError_t status = stage(buffers, problem, tokens, features, saliency, relevance, d);
    if (status != cudaSuccess)
    {
        return static_cast<int32_t>(status);
    }

    cudaStream_t stream = nullptr;
    cudaEvent_t start = nullptr;
    cudaEvent_t stop = nullptr;
    status = cudaStreamCreate(&stream);
    if (status == cudaSuccess)
        status = cudaEventCreate(&start);
    if (status == cudaSuccess)
        status = cudaEventCreate(&stop);
    for (int32_t it = 0; status == cudaSuccess && it < warmup + iterations; ++it)
    {
        bool const timed = it >= warmup;
        if (timed)
            status = cudaEventRecord(start, stream);
        if (status == cudaSuccess)
            status = launch(tokensDtype, d.tokens, d.features, featuresDtype, d.saliency, d.relevance, scoresDtype,
                d.pruned, static_cast<int64_t*>(d.kept), problem.params, d.workspace, d.workspaceBytes, stream);
        if (status == cudaSuccess && timed)
            status = cudaEventRecord(stop, stream);
        if (status == cudaSuccess)
            status = cudaStreamSynchronize(stream);
        if (status == cudaSuccess && timed)
            status = cudaEventElapsedTime(&timesMs[it - warmup], start, stop);
    }
    if (stop != nullptr)
        cudaEventDestroy(stop);
    if (start != nullptr)
        cudaEventDestroy(start);
    if (stream != nullptr)
        cudaStreamDestroy(stream);
    return static_cast<int32_t>(status);
}
