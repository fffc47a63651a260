"""vLLM's VLM classes with an images-only HF processor: served without torchvision (see ``vllm_plugin``).

Imported by vLLM only (``ModelRegistry`` resolves ``vlsi.extract.backends.vllm_models:<arch>`` when such a model
is served, in whichever vLLM process needs the class), never by the project's own code paths.

Two things stand between vLLM's model code and a machine without torchvision, and both are handled here:

1. vLLM's ``qwen2_vl`` module imports ``smart_resize`` from ``transformers.models.qwen2_vl.
   image_processing_qwen2_vl`` and its ``pixtral`` module (imported by ``llava_onevision``) imports
   ``_num_image_tokens`` from ``transformers.models.pixtral.image_processing_pixtral``: the torchvision backends'
   modules, whose first lines import torchvision. The PIL backends' modules define the same functions (the same
   code in transformers 5.19). Only while vLLM's module is imported here, those module names resolve to the PIL
   modules; they are removed again afterwards, so nothing else in the process sees the substitution.
2. The family processors (``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``LlavaOnevisionProcessor``) load a video
   processor that needs torchvision. :func:`images_only` derives the same processor without the video attribute:
   ``from_pretrained`` loads only the image processor (``AutoImageProcessor``, which falls back to the PIL class
   without torchvision) and the tokenizer; image processing, prompt expansion and token counts are the base
   class's. The ProcessingInfo subclasses below hand that processor to vLLM's own multimodal processors.

Each architecture is built on first access (module ``__getattr__``): serving Qwen2-VL imports nothing of LLaVA's.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

# torchvision backend module -> PIL backend module defining the same helpers vLLM imports.
_PIL_TWINS = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl":
        "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
    "transformers.models.pixtral.image_processing_pixtral": "transformers.models.pixtral.image_processing_pil_pixtral",
}


@contextlib.contextmanager
def _pil_image_processing_modules():
    """While importing vLLM's model modules: each torchvision image-processing module name -> its PIL twin."""
    added = []
    for tv, pil in _PIL_TWINS.items():
        if tv in sys.modules:
            continue
        try:
            importlib.import_module(tv)
            continue  # importable (torchvision is there): nothing to substitute
        except ImportError:
            pass
        sys.modules[tv] = importlib.import_module(pil)
        added.append(tv)
    try:
        yield
    finally:
        for tv in added:
            sys.modules.pop(tv, None)


def images_only(base: type) -> type:
    """``base`` (an HF ``ProcessorMixin`` with ``image_processor``, ``tokenizer``, ``video_processor``) minus the
    video processor.

    ``ProcessorMixin`` reads the ``__init__`` signature to know which sub-processors to load and check
    (``get_attributes``) and which ``processor_config.json`` entries to pass (``from_args_and_dict`` reads the code
    object's argument names), so the derived ``__init__`` has the base's named parameters except
    ``video_processor``. It calls the base ``__init__`` with ``video_processor=None``: the base sets its token
    attributes, then calls ``ProcessorMixin.__init__(image_processor, tokenizer, video_processor, ...)``, whose
    positional arguments pair with this class's two attributes; the trailing ``None`` pairs with none and is
    dropped.
    """
    import inspect

    params = [p for n, p in inspect.signature(base.__init__).parameters.items() if n != "video_processor"]
    names = [p.name for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    if names[:2] != ["image_processor", "tokenizer"] or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{base.__name__}.__init__ has an unexpected signature: {inspect.signature(base.__init__)}")
    defaults = {p.name: p.default for p in params[1:] if p.kind is p.POSITIONAL_OR_KEYWORD}
    # A real function with these parameter names (from_args_and_dict inspects __code__.co_varnames).
    src = (f"def __init__(self, {', '.join(f'{n}=_d[{n!r}]' for n in names)}, **kwargs):\n"
           f"    _base.__init__(self, {', '.join(f'{n}={n}' for n in names)}, video_processor=None, **kwargs)\n")
    scope: dict = {"_d": defaults, "_base": base}
    exec(src, scope)  # noqa: S102 - source built from the base class's own parameter names
    name = base.__name__ + "ImagesOnly"
    return type(name, (base,), {"__init__": scope["__init__"], "__module__": __name__, "__qualname__": name,
                                "__doc__": f"{base.__name__} without its video processor (no torchvision)."})


def _build(arch: str) -> dict:
    """{name: object} for ``arch``: the images-only processor, and the model class registered with it."""
    with _pil_image_processing_modules():
        from vllm.multimodal import MULTIMODAL_REGISTRY

        if arch == "Qwen2VLForConditionalGeneration":
            from transformers.models.qwen2_vl import Qwen2VLProcessor as hf_processor
            from vllm.model_executor.models import qwen2_vl as m

            info, proc, dummy, model = (m.Qwen2VLProcessingInfo, m.Qwen2VLMultiModalProcessor,
                                        m.Qwen2VLDummyInputsBuilder, m.Qwen2VLForConditionalGeneration)
        elif arch == "Qwen2_5_VLForConditionalGeneration":
            from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor as hf_processor
            from vllm.model_executor.models import qwen2_5_vl as m

            info, proc, dummy, model = (m.Qwen2_5_VLProcessingInfo, m.Qwen2_5_VLMultiModalProcessor,
                                        m.Qwen2_5_VLDummyInputsBuilder, m.Qwen2_5_VLForConditionalGeneration)
        elif arch == "LlavaOnevisionForConditionalGeneration":
            from transformers import LlavaOnevisionProcessor as hf_processor
            from vllm.model_executor.models import llava_onevision as m

            info, proc, dummy, model = (m.LlavaOnevisionProcessingInfo, m.LlavaOnevisionMultiModalProcessor,
                                        m.LlavaOnevisionDummyInputsBuilder, m.LlavaOnevisionForConditionalGeneration)
        else:
            raise AttributeError(arch)
    processor_cls = images_only(hf_processor)

    def get_hf_processor(self, **kwargs):
        return self.ctx.get_hf_processor(processor_cls, **kwargs)

    def get_supported_mm_limits(self):  # no video processor: images only
        return {k: v for k, v in info.get_supported_mm_limits(self).items() if k != "video"}

    info_cls = type(info.__name__, (info,), {"get_hf_processor": get_hf_processor, "__module__": __name__,
                                             "get_supported_mm_limits": get_supported_mm_limits})
    model_cls = type(arch, (model,), {"__module__": __name__, "__qualname__": arch,
                                      "__doc__": f"vLLM's {arch}, images-only HF processor (no torchvision)."})
    MULTIMODAL_REGISTRY.register_processor(proc, info=info_cls, dummy_inputs=dummy)(model_cls)
    return {arch: model_cls, processor_cls.__name__: processor_cls}


_ARCHS = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
          "LlavaOnevisionForConditionalGeneration")
_PROCESSORS = {"Qwen2VLProcessorImagesOnly": _ARCHS[0], "Qwen2_5_VLProcessorImagesOnly": _ARCHS[1],
               "LlavaOnevisionProcessorImagesOnly": _ARCHS[2]}


def __getattr__(name: str):
    arch = name if name in _ARCHS else _PROCESSORS.get(name)
    if arch is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals().update(_build(arch))  # module-level names: vLLM may pickle a processor by reference to its class
    return globals()[name]
