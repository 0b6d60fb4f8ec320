// FocusScanRefine TensorRT plugin: IPluginV3 glue over the CUDA launcher of focusScanRefineKernel.h.
//
// Plugin "FocusScanRefine", version "1", namespace "fsr" (docs/fsr-op.md, ONNX domain `fsr`): the
// names, attributes, defaults and ranges come from focusScanRefineIdentity.h, which the build
// generates from pruning/focus_scan_refine.yaml (plugin/generate_identity_header.py).
// Written against the TensorRT 10 plugin API (IPluginV3 + IPluginV3OneCore/Build/Runtime,
// IPluginCreatorV3One). See README.md for inputs, outputs, attributes and limits.
#pragma once

#include "focusScanRefineIdentity.h"
#include "focusScanRefineKernel.h"

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace fsr
{
namespace plugin
{

constexpr char const* kPluginName = identity::kPluginName;
constexpr char const* kPluginVersion = identity::kPluginVersion;
constexpr char const* kPluginNamespace = identity::kPluginNamespace;

//! Attributes of one FocusScanRefine node; defaults from the identity file.
struct FocusScanRefineAttributes
{
    int32_t budget{0};
    float alpha{static_cast<float>(identity::kAttributes[identity::kAlpha].defaultValue)};
    float beta{static_cast<float>(identity::kAttributes[identity::kBeta].defaultValue)};
    float rho{static_cast<float>(identity::kAttributes[identity::kRho].defaultValue)};
    float kappa{static_cast<float>(identity::kAttributes[identity::kKappa].defaultValue)};
    float keepRatio{static_cast<float>(identity::kAttributes[identity::kKeepRatio].defaultValue)};
};

class FocusScanRefinePlugin : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime
{
public:
    //! nbInputs: 3 or 4 when known (deserialization), else -1 until configurePlugin/onShapeChange.
    explicit FocusScanRefinePlugin(FocusScanRefineAttributes const& attributes, int32_t nbInputs = -1);
    FocusScanRefinePlugin(FocusScanRefinePlugin const& other);
    FocusScanRefinePlugin& operator=(FocusScanRefinePlugin const&) = delete;
    ~FocusScanRefinePlugin() override = default;

    // IPluginV3
    nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
    nvinfer1::IPluginV3* clone() noexcept override;

    // IPluginV3OneCore
    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;

    // IPluginV3OneBuild
    int32_t getNbOutputs() const noexcept override;
    int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs,
        nvinfer1::DataType const* inputTypes, int32_t nbInputs) const noexcept override;
    int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
        int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
        nvinfer1::IExprBuilder& exprBuilder) noexcept override;
    bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
        int32_t nbOutputs) noexcept override;
    int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
    size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
        nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

    // IPluginV3OneRuntime
    int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
        int32_t nbOutputs) noexcept override;
    int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
        void const* const* inputs, void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
    nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

private:
    FocusScanRefineAttributes mAttributes;
    int32_t mNbInputs{-1}; // 3 or 4 once known (configurePlugin / onShapeChange)
    std::vector<nvinfer1::PluginField> mSerializedFields;
    nvinfer1::PluginFieldCollection mSerializedCollection{};
};

class FocusScanRefinePluginCreator : public nvinfer1::IPluginCreatorV3One
{
public:
    FocusScanRefinePluginCreator();
    ~FocusScanRefinePluginCreator() override = default;

    char const* getPluginName() const noexcept override;
    char const* getPluginVersion() const noexcept override;
    char const* getPluginNamespace() const noexcept override;
    nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
    nvinfer1::IPluginV3* createPlugin(
        char const* name, nvinfer1::PluginFieldCollection const* fc, nvinfer1::TensorRTPhase phase) noexcept override;

private:
    std::vector<nvinfer1::PluginField> mFields;
    nvinfer1::PluginFieldCollection mFieldCollection{};
};

} // namespace plugin
} // namespace fsr
