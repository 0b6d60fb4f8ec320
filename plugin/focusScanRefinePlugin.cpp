// FocusScanRefine TensorRT plugin (TensorRT 10, IPluginV3). Shapes, formats, serialization and an
// enqueue that only dispatches on the tokens dtype and calls fsr::kernels::launchFocusScanRefine.
// Attribute names, defaults and ranges: focusScanRefineIdentity.h (generated from the op's YAML).
//
// NOTE: compiled (syntax + object, g++ 12) against excerpts of the public TensorRT 10.0 headers only;
// never built with a full TensorRT install, linked against libnvinfer or run; see README.md.
#include "focusScanRefinePlugin.h"

#include <cuda_fp16.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#ifndef FSR_PLUGIN_STATIC_REGISTRATION
#define FSR_PLUGIN_STATIC_REGISTRATION 1
#endif

#define FSR_PLUGIN_API __attribute__((visibility("default")))

using nvinfer1::DataType;
using nvinfer1::DimensionOperation;
using nvinfer1::DimsExprs;
using nvinfer1::DynamicPluginTensorDesc;
using nvinfer1::IExprBuilder;
using nvinfer1::PluginField;
using nvinfer1::PluginFieldCollection;
using nvinfer1::PluginFieldType;
using nvinfer1::PluginTensorDesc;
using nvinfer1::TensorFormat;

namespace fsr
{
namespace plugin
{
namespace
{

// Input / output positions.
constexpr int32_t kTokens = 0;
constexpr int32_t kFeatures = 1;
constexpr int32_t kSaliency = 2;
constexpr int32_t kRelevance = 3;
constexpr int32_t kNbOutputs = 2;

// --- logging ----------------------------------------------------------------------------------

std::mutex gLoggerMutex;
nvinfer1::ILoggerFinder* gLoggerFinder{nullptr};

void log(nvinfer1::ILogger::Severity severity, std::string const& message) noexcept
{
    try
    {
        std::string const text = std::string("[fsr::FocusScanRefine] ") + message;
        nvinfer1::ILogger* logger = nullptr;
        {
            std::lock_guard<std::mutex> lock(gLoggerMutex);
            logger = gLoggerFinder != nullptr ? gLoggerFinder->findLogger() : nullptr;
        }
        if (logger != nullptr)
        {
            logger->log(severity, text.c_str());
        }
        else if (severity <= nvinfer1::ILogger::Severity::kWARNING)
        {
            std::fprintf(stderr, "%s\n", text.c_str());
        }
    }
    catch (...)
    {
    }
}

void logError(std::string const& message) noexcept
{
    log(nvinfer1::ILogger::Severity::kERROR, message);
}

//! Logs the exception in flight; call from a catch block.
void logCurrentException(char const* where) noexcept
{
    try
    {
        throw;
    }
    catch (std::exception const& e)
    {
        logError(std::string(where) + ": " + e.what());
    }
    catch (...)
    {
        logError(std::string(where) + ": unknown exception");
    }
}

void check(bool condition, std::string const& message)
{
    if (!condition)
    {
        throw std::invalid_argument(message);
    }
}

// --- attribute parsing ----------------------------------------------------------------------

int64_t readInt(PluginField const& field)
{
    check(field.data != nullptr && field.length >= 1, std::string("attribute '") + field.name + "' has no value");
    switch (field.type)
    {
    case PluginFieldType::kINT32: return *static_cast<int32_t const*>(field.data);
    case PluginFieldType::kINT64: return *static_cast<int64_t const*>(field.data);
    case PluginFieldType::kINT16: return *static_cast<int16_t const*>(field.data);
    case PluginFieldType::kINT8: return *static_cast<int8_t const*>(field.data);
    default: break;
    }
    throw std::invalid_argument(std::string("attribute '") + field.name + "' must be an integer");
}

float readFloat(PluginField const& field)
{
    check(field.data != nullptr && field.length >= 1, std::string("attribute '") + field.name + "' has no value");
    switch (field.type)
    {
    case PluginFieldType::kFLOAT32: return *static_cast<float const*>(field.data);
    case PluginFieldType::kFLOAT64: return static_cast<float>(*static_cast<double const*>(field.data));
    case PluginFieldType::kINT32: return static_cast<float>(*static_cast<int32_t const*>(field.data));
    case PluginFieldType::kINT64: return static_cast<float>(*static_cast<int64_t const*>(field.data));
    default: break;
    }
    throw std::invalid_argument(std::string("attribute '") + field.name + "' must be a float");
}

static_assert(identity::kPluginMaxTokens == kernels::kMaxTokens, "identity file and kernels disagree on max N");
static_assert(identity::kNbOutputs == 2 && identity::kMinInputs == 3 && identity::kMaxInputs == 4,
    "the plugin implements tokens, features, saliency[, relevance] -> pruned, kept_indices");

//! Pointer to the field of `a` that holds attribute `index` (identity::kBudget, ...).
void* attributeField(FocusScanRefineAttributes& a, int32_t index)
{
    switch (index)
    {
    case identity::kBudget: return &a.budget;
    case identity::kAlpha: return &a.alpha;
    case identity::kBeta: return &a.beta;
    case identity::kRho: return &a.rho;
    case identity::kKappa: return &a.kappa;
    case identity::kKeepRatio: return &a.keepRatio;
    default: break;
    }
    throw std::invalid_argument("unknown attribute index " + std::to_string(index));
}

double attributeValue(FocusScanRefineAttributes& a, int32_t index)
{
    void* field = attributeField(a, index);
    return identity::kAttributes[index].isInteger ? static_cast<double>(*static_cast<int32_t*>(field))
                                                  : static_cast<double>(*static_cast<float*>(field));
}

//! The ranges of the identity file (the same rules as fsr.pruning.fsr_identity.check_attributes).
void validateAttributes(FocusScanRefineAttributes const& attributes)
{
    FocusScanRefineAttributes a = attributes;
    for (int32_t i = 0; i < identity::kNbAttributes; ++i)
    {
        identity::AttributeSpec const& spec = identity::kAttributes[i];
        double const value = attributeValue(a, i);
        std::string const name = std::string("attribute '") + spec.name + "'";
        check(!spec.finite || std::isfinite(value), name + " must be a finite number");
        bool const below = value < spec.min || (value == spec.min && !spec.minInclusive);
        bool const above = value > spec.max || (value == spec.max && !spec.maxInclusive);
        check(!below && !above,
            name + " = " + std::to_string(value) + " is outside its range " + (spec.minInclusive ? "[" : "(")
                + std::to_string(spec.min) + ", " + std::to_string(spec.max) + (spec.maxInclusive ? "]" : ")"));
    }
}

int32_t toInt32(int64_t value, char const* what)
{
    check(value >= 0 && value <= std::numeric_limits<int32_t>::max(),
        std::string(what) + " out of range: " + std::to_string(value));
    return static_cast<int32_t>(value);
}

bool isFloatOrHalf(DataType type)
{
    return type == DataType::kFLOAT || type == DataType::kHALF;
}

kernels::FloatType floatType(DataType type)
{
    return type == DataType::kHALF ? kernels::FloatType::kFLOAT16 : kernels::FloatType::kFLOAT32;
}

} // namespace

// =============================================================================================
// FocusScanRefinePlugin
// =============================================================================================

FocusScanRefinePlugin::FocusScanRefinePlugin(FocusScanRefineAttributes const& attributes, int32_t nbInputs)
    : mAttributes(attributes)
    , mNbInputs(nbInputs)
{
    validateAttributes(mAttributes);
}

FocusScanRefinePlugin::FocusScanRefinePlugin(FocusScanRefinePlugin const& other)
    : nvinfer1::IPluginV3()
    , nvinfer1::IPluginV3OneCore()
    , nvinfer1::IPluginV3OneBuild()
    , nvinfer1::IPluginV3OneRuntime()
    , mAttributes(other.mAttributes)
    , mNbInputs(other.mNbInputs)
{
}

nvinfer1::IPluginCapability* FocusScanRefinePlugin::getCapabilityInterface(
    nvinfer1::PluginCapabilityType type) noexcept
{
    try
    {
        switch (type)
        {
        case nvinfer1::PluginCapabilityType::kBUILD: return static_cast<nvinfer1::IPluginV3OneBuild*>(this);
        case nvinfer1::PluginCapabilityType::kRUNTIME: return static_cast<nvinfer1::IPluginV3OneRuntime*>(this);
        case nvinfer1::PluginCapabilityType::kCORE: return static_cast<nvinfer1::IPluginV3OneCore*>(this);
        }
    }
    catch (...)
    {
        logCurrentException("getCapabilityInterface");
    }
    return nullptr;
}

nvinfer1::IPluginV3* FocusScanRefinePlugin::clone() noexcept
{
    try
    {
        return new FocusScanRefinePlugin(*this);
    }
    catch (...)
    {
        logCurrentException("clone");
    }
    return nullptr;
}

char const* FocusScanRefinePlugin::getPluginName() const noexcept
{
    return kPluginName;
}

char const* FocusScanRefinePlugin::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* FocusScanRefinePlugin::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

int32_t FocusScanRefinePlugin::getNbOutputs() const noexcept
{
    return kNbOutputs;
}

int32_t FocusScanRefinePlugin::getOutputDataTypes(
    DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes, int32_t nbInputs) const noexcept
{
    try
    {
        check(outputTypes != nullptr && inputTypes != nullptr, "null type arrays");
        check(nbOutputs == kNbOutputs, "expected 2 outputs");
        check(nbInputs == 3 || nbInputs == 4, "expected 3 or 4 inputs (tokens, features, saliency[, relevance])");
        check(isFloatOrHalf(inputTypes[kTokens]), "tokens must be float32 or float16");
        outputTypes[0] = inputTypes[kTokens]; // pruned: same dtype as tokens
        outputTypes[1] = DataType::kINT64;    // kept_indices
        return 0;
    }
    catch (...)
    {
        logCurrentException("getOutputDataTypes");
    }
    return -1;
}

int32_t FocusScanRefinePlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs,
    DimsExprs const* /*shapeInputs*/, int32_t /*nbShapeInputs*/, DimsExprs* outputs, int32_t nbOutputs,
    IExprBuilder& exprBuilder) noexcept
{
    try
    {
        check(inputs != nullptr && outputs != nullptr, "null shape arrays");
        check(nbInputs == 3 || nbInputs == 4, "expected 3 or 4 inputs (tokens, features, saliency[, relevance])");
        check(nbOutputs == kNbOutputs, "expected 2 outputs");
        check(inputs[kTokens].nbDims == 3, "tokens must be [B, N, D]");
        check(inputs[kFeatures].nbDims == 3, "features must be [B, N, F]");
        check(inputs[kSaliency].nbDims == 2, "saliency must be [B, N]");
        check(nbInputs == 3 || inputs[kRelevance].nbDims == 2, "relevance must be [B, N]");

        // K = min(budget, N), or with keep_ratio > 0 min(N, max(1, floor(keep_ratio * N))) from the exact
        // integers of keepRatioParts (the ONNX function body computes the same).
        nvinfer1::IDimensionExpr const* n = inputs[kTokens].d[1];
        nvinfer1::IDimensionExpr const* keep = nullptr;
        if (mAttributes.keepRatio > 0.0F)
        {
            int64_t hi = 0;
            int64_t lo = 0;
            kernels::keepRatioParts(mAttributes.keepRatio, hi, lo);
            auto const* scale = exprBuilder.constant(16777216);
            auto const* hiN = exprBuilder.operation(DimensionOperation::kPROD, *exprBuilder.constant(hi), *n);
            auto const* loN = exprBuilder.operation(DimensionOperation::kPROD, *exprBuilder.constant(lo), *n);
            auto const* sum = exprBuilder.operation(DimensionOperation::kSUM, *hiN,
                *exprBuilder.operation(DimensionOperation::kFLOOR_DIV, *loN, *scale));
            auto const* raw = exprBuilder.operation(DimensionOperation::kFLOOR_DIV, *sum, *scale);
            keep = exprBuilder.operation(DimensionOperation::kMIN, *n,
                *exprBuilder.operation(DimensionOperation::kMAX, *raw, *exprBuilder.constant(1)));
        }
        else
        {
            keep = exprBuilder.operation(
                DimensionOperation::kMIN, *n, *exprBuilder.constant(static_cast<int64_t>(mAttributes.budget)));
        }
        check(keep != nullptr, "IExprBuilder failed");

        outputs[0].nbDims = 3; // pruned [B, K, D]
        outputs[0].d[0] = inputs[kTokens].d[0];
        outputs[0].d[1] = keep;
        outputs[0].d[2] = inputs[kTokens].d[2];
        outputs[1].nbDims = 2; // kept_indices [B, K]
        outputs[1].d[0] = inputs[kTokens].d[0];
        outputs[1].d[1] = keep;
        return 0;
    }
    catch (...)
    {
        logCurrentException("getOutputShapes");
    }
    return -1;
}

bool FocusScanRefinePlugin::supportsFormatCombination(
    int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs, int32_t nbOutputs) noexcept
{
    try
    {
        check(inOut != nullptr, "null tensor descriptions");
        check(nbInputs == 3 || nbInputs == 4, "expected 3 or 4 inputs");
        check(nbOutputs == kNbOutputs, "expected 2 outputs");
        check(pos >= 0 && pos < nbInputs + nbOutputs, "position out of range");
        PluginTensorDesc const& desc = inOut[pos].desc;
        if (desc.format != TensorFormat::kLINEAR)
        {
            return false;
        }
        if (pos == kTokens || pos == kFeatures)
        {
            return isFloatOrHalf(desc.type); // fp32 / fp16, read as float inside
        }
        if (pos < nbInputs) // saliency, relevance: scores stay fp32
        {
            return desc.type == DataType::kFLOAT;
        }
        if (pos == nbInputs) // pruned: dtype of tokens
        {
            return desc.type == inOut[kTokens].desc.type;
        }
        return desc.type == DataType::kINT64; // kept_indices
    }
    catch (...)
    {
        logCurrentException("supportsFormatCombination");
    }
    return false;
}

int32_t FocusScanRefinePlugin::configurePlugin(
    DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        check(in != nullptr && out != nullptr, "null tensor descriptions");
        check(nbInputs == 3 || nbInputs == 4, "expected 3 or 4 inputs");
        check(nbOutputs == kNbOutputs, "expected 2 outputs");
        int64_t const maxTokens = in[kTokens].max.d[1];
        check(maxTokens <= kernels::kMaxTokens,
            "N (tokens dim 1) may reach " + std::to_string(maxTokens) + " but the kernels support at most "
                + std::to_string(kernels::kMaxTokens));
        mNbInputs = nbInputs;
        return 0;
    }
    catch (...)
    {
        logCurrentException("configurePlugin");
    }
    return -1;
}

size_t FocusScanRefinePlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
    DynamicPluginTensorDesc const* /*outputs*/, int32_t /*nbOutputs*/) const noexcept
{
    try
    {
        check(inputs != nullptr && nbInputs >= 3, "expected 3 or 4 inputs");
        // Sized for the profile's largest shapes; any smaller call needs no more.
        int32_t const batch = toInt32(inputs[kTokens].max.d[0], "batch");
        int32_t const numTokens = toInt32(inputs[kTokens].max.d[1], "N");
        int32_t const featureDim = toInt32(inputs[kFeatures].max.d[2], "F");
        int32_t const keep = kernels::keptCount(mAttributes.budget, mAttributes.keepRatio, numTokens);
        return kernels::focusScanRefineWorkspaceSize(batch, numTokens, featureDim, keep);
    }
    catch (...)
    {
        logCurrentException("getWorkspaceSize");
    }
    return 0;
}

int32_t FocusScanRefinePlugin::onShapeChange(
    PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const* out, int32_t nbOutputs) noexcept
{
    try
    {
        check(in != nullptr && out != nullptr, "null tensor descriptions");
        check(nbInputs == 3 || nbInputs == 4, "expected 3 or 4 inputs");
        check(nbOutputs == kNbOutputs, "expected 2 outputs");
        check(in[kTokens].dims.nbDims == 3 && in[kFeatures].dims.nbDims == 3 && in[kSaliency].dims.nbDims == 2,
            "unexpected input ranks");
        check(in[kFeatures].dims.d[1] == in[kTokens].dims.d[1] && in[kSaliency].dims.d[1] == in[kTokens].dims.d[1],
            "tokens, features and saliency must have the same N");
        check(in[kTokens].dims.d[1] <= kernels::kMaxTokens,
            "N = " + std::to_string(in[kTokens].dims.d[1]) + " exceeds the kernels' limit of "
                + std::to_string(kernels::kMaxTokens));
        mNbInputs = nbInputs;
        return 0;
    }
    catch (...)
    {
        logCurrentException("onShapeChange");
    }
    return -1;
}

int32_t FocusScanRefinePlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const* outputDesc,
    void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept
{
    try
    {
        check(inputDesc != nullptr && outputDesc != nullptr && inputs != nullptr && outputs != nullptr,
            "null enqueue arguments");
        check(mNbInputs == 3 || mNbInputs == 4, "number of inputs unknown (onShapeChange not called?)");
        nvinfer1::Dims const& tokenDims = inputDesc[kTokens].dims;
        kernels::FocusScanRefineParams params;
        params.batch = toInt32(tokenDims.d[0], "batch");
        params.numTokens = toInt32(tokenDims.d[1], "N");
        params.tokenDim = toInt32(tokenDims.d[2], "D");
        params.featureDim = toInt32(inputDesc[kFeatures].dims.d[2], "F");
        params.budget = mAttributes.budget;
        params.alpha = mAttributes.alpha;
        params.beta = mAttributes.beta;
        params.rho = mAttributes.rho;
        params.kappa = mAttributes.kappa;
        params.keepRatio = mAttributes.keepRatio;

        void const* relevance = mNbInputs == 4 ? inputs[kRelevance] : nullptr;
        size_t const workspaceBytes = kernels::focusScanRefineWorkspaceSize(params.batch, params.numTokens,
            params.featureDim, kernels::keptCount(params.budget, params.keepRatio, params.numTokens));
        auto* keptIndices = static_cast<int64_t*>(outputs[1]);

        cudaError_t status = cudaErrorInvalidValue;
        switch (inputDesc[kTokens].type)
        {
        case DataType::kFLOAT:
            status = kernels::launchFocusScanRefine<float>(static_cast<float const*>(inputs[kTokens]),
                inputs[kFeatures], floatType(inputDesc[kFeatures].type), inputs[kSaliency], relevance,
                floatType(inputDesc[kSaliency].type), static_cast<float*>(outputs[0]), keptIndices, params, workspace,
                workspaceBytes, stream);
            break;
        case DataType::kHALF:
            status = kernels::launchFocusScanRefine<__half>(static_cast<__half const*>(inputs[kTokens]),
                inputs[kFeatures], floatType(inputDesc[kFeatures].type), inputs[kSaliency], relevance,
                floatType(inputDesc[kSaliency].type), static_cast<__half*>(outputs[0]), keptIndices, params,
                workspace, workspaceBytes, stream);
            break;
        default: throw std::invalid_argument("tokens must be float32 or float16");
        }
        if (status != cudaSuccess)
        {
            logError(std::string("kernel launch failed: ") + cudaGetErrorString(status));
            return -1;
        }
        return 0;
    }
    catch (...)
    {
        logCurrentException("enqueue");
    }
    return -1;
}

nvinfer1::IPluginV3* FocusScanRefinePlugin::attachToContext(nvinfer1::IPluginResourceContext* /*context*/) noexcept
{
    return clone(); // no per-context resources
}

PluginFieldCollection const* FocusScanRefinePlugin::getFieldsToSerialize() noexcept
{
    try
    {
        // Pointers into this object: rebuilt on every call so a clone never points at its source.
        mSerializedFields.clear();
        for (int32_t i = 0; i < identity::kNbAttributes; ++i)
        {
            identity::AttributeSpec const& spec = identity::kAttributes[i];
            mSerializedFields.emplace_back(spec.name, attributeField(mAttributes, i),
                spec.isInteger ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32, 1);
        }
        if (mNbInputs == 3 || mNbInputs == 4)
        {
            // Not an ONNX attribute: lets a deserialized plugin know whether relevance is wired.
            mSerializedFields.emplace_back("num_inputs", &mNbInputs, PluginFieldType::kINT32, 1);
        }
        mSerializedCollection.nbFields = static_cast<int32_t>(mSerializedFields.size());
        mSerializedCollection.fields = mSerializedFields.data();
        return &mSerializedCollection;
    }
    catch (...)
    {
        logCurrentException("getFieldsToSerialize");
    }
    return nullptr;
}

// =============================================================================================
// FocusScanRefinePluginCreator
// =============================================================================================

FocusScanRefinePluginCreator::FocusScanRefinePluginCreator()
{
    for (int32_t i = 0; i < identity::kNbAttributes; ++i)
    {
        identity::AttributeSpec const& spec = identity::kAttributes[i];
        mFields.emplace_back(spec.name, nullptr, spec.isInteger ? PluginFieldType::kINT32 : PluginFieldType::kFLOAT32, 1);
    }
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
}

char const* FocusScanRefinePluginCreator::getPluginName() const noexcept
{
    return kPluginName;
}

char const* FocusScanRefinePluginCreator::getPluginVersion() const noexcept
{
    return kPluginVersion;
}

char const* FocusScanRefinePluginCreator::getPluginNamespace() const noexcept
{
    return kPluginNamespace;
}

PluginFieldCollection const* FocusScanRefinePluginCreator::getFieldNames() noexcept
{
    return &mFieldCollection;
}

nvinfer1::IPluginV3* FocusScanRefinePluginCreator::createPlugin(
    char const* name, PluginFieldCollection const* fc, nvinfer1::TensorRTPhase /*phase*/) noexcept
{
    try
    {
        check(fc != nullptr, "no attributes given");
        check(fc->nbFields == 0 || fc->fields != nullptr, "null attribute array");
        FocusScanRefineAttributes attributes;
        bool given[identity::kNbAttributes] = {};
        int32_t nbInputs = -1;
        for (int32_t i = 0; i < fc->nbFields; ++i)
        {
            PluginField const& field = fc->fields[i];
            if (field.name == nullptr)
            {
                continue;
            }
            std::string const key(field.name);
            int32_t index = -1;
            for (int32_t a = 0; a < identity::kNbAttributes; ++a)
            {
                index = key == identity::kAttributes[a].name ? a : index;
            }
            if (index >= 0)
            {
                if (identity::kAttributes[index].isInteger)
                {
                    int64_t const value = readInt(field);
                    check(value >= identity::kAttributes[index].min && value <= identity::kAttributes[index].max,
                        "attribute '" + key + "' must be in [" + std::to_string(identity::kAttributes[index].min)
                            + ", " + std::to_string(identity::kAttributes[index].max) + "], got "
                            + std::to_string(value));
                    *static_cast<int32_t*>(attributeField(attributes, index)) = static_cast<int32_t>(value);
                }
                else
                {
                    *static_cast<float*>(attributeField(attributes, index)) = readFloat(field);
                }
                given[index] = true;
            }
            else if (key == "num_inputs")
            {
                int64_t const n = readInt(field);
                check(n == identity::kMinInputs || n == identity::kMaxInputs, "serialized 'num_inputs' must be 3 or 4");
                nbInputs = static_cast<int32_t>(n);
            }
            // Anything else (the ONNX parser also passes plugin_namespace / plugin_version) is ignored.
        }
        for (int32_t a = 0; a < identity::kNbAttributes; ++a)
        {
            check(given[a] || !identity::kAttributes[a].required,
                std::string("attribute '") + identity::kAttributes[a].name + "' is required");
        }
        validateAttributes(attributes);
        return new FocusScanRefinePlugin(attributes, nbInputs);
    }
    catch (...)
    {
        logCurrentException(std::string("createPlugin(").append(name != nullptr ? name : "").append(")").c_str());
    }
    return nullptr;
}

} // namespace plugin
} // namespace fsr

// =============================================================================================
// Library entry points
// =============================================================================================

namespace
{

fsr::plugin::FocusScanRefinePluginCreator& creatorInstance()
{
    static fsr::plugin::FocusScanRefinePluginCreator creator;
    return creator;
}

bool gStaticallyRegistered = false;

#if FSR_PLUGIN_STATIC_REGISTRATION
//! Registers the creator when the library is loaded (dlopen), which is what
//! `polygraphy run --plugins libfsr_plugin.so` and `trtexec --staticPlugins=libfsr_plugin.so` rely on.
struct StaticRegistration
{
    StaticRegistration()
    {
        try
        {
            nvinfer1::IPluginRegistry* registry = getPluginRegistry();
            if (registry != nullptr)
            {
                gStaticallyRegistered = registry->registerCreator(creatorInstance(), fsr::plugin::kPluginNamespace);
            }
        }
        catch (...)
        {
            fsr::plugin::logCurrentException("static registration");
        }
    }
};
StaticRegistration const gStaticRegistration;
#endif

} // namespace

//! Called by IPluginRegistry::loadLibrary (trtexec --dynamicPlugins) before getCreators.
extern "C" FSR_PLUGIN_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder)
{
    std::lock_guard<std::mutex> lock(fsr::plugin::gLoggerMutex);
    fsr::plugin::gLoggerFinder = finder;
}

//! IPluginRegistry::loadLibrary entry point. When the static registration above already put the
//! creator in the global registry, report none so that it is not registered twice.
extern "C" FSR_PLUGIN_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators)
{
    static nvinfer1::IPluginCreatorInterface* creators[] = {&creatorInstance()};
    nbCreators = gStaticallyRegistered ? 0 : 1;
    return creators;
}
