"""Test-only start-up shim for the Hugging Face reference runs of the Qwen-VL families (put on PYTHONPATH by tests).

* LLaMA-Factory 0.9.5's `load_model` refuses models with Conv3D under torch 2.9.x (a GPU performance guard,
  pytorch/pytorch#166122); Qwen2-VL's patch embedding is a Conv3D. The reference run on CPU is not affected, so
  this shim makes the guard's version test answer False for "2.9.0" once `llamafactory.model.loader` is imported.
* transformers 5's Qwen2-VL model refuses to compute its mRoPE positions without the processor's
  `mm_token_type_ids` (1 at image tokens, 2 at video tokens), and LLaMA-Factory 0.9.5's KTO trainer passes
  neither those nor the collator's position ids. Where the model is asked to compute positions without them,
  this shim derives them from the input ids and the config's image / video token ids, as the processor does.
  A run that passes position ids (sft, dpo, rm: the collator computes them) or `mm_token_type_ids` never
  reaches it.
"""

import importlib.abc
import importlib.util
import sys


def _lift_conv3d_guard(module) -> None:
    original = module.is_torch_version_greater_than
    module.is_torch_version_greater_than = lambda v: False if v == "2.9.0" else original(v)


def _derive_mm_token_type_ids(module) -> None:
    model_cls = module.Qwen2VLModel
    original = model_cls.compute_3d_position_ids

    def compute_3d_position_ids(self, input_ids, inputs_embeds, image_grid_thw=None, video_grid_thw=None,
                                attention_mask=None, past_key_values=None, mm_token_type_ids=None):
        if mm_token_type_ids is None and input_ids is not None and (image_grid_thw is not None
                                                                     or video_grid_thw is not None):
            mm_token_type_ids = ((input_ids == self.config.image_token_id).int()
                                 + 2 * (input_ids == self.config.video_token_id).int())
        return original(self, input_ids, inputs_embeds, image_grid_thw, video_grid_thw, attention_mask,
                        past_key_values, mm_token_type_ids)

    model_cls.compute_3d_position_ids = compute_3d_position_ids


_PATCHES = {"llamafactory.model.loader": _lift_conv3d_guard,
            "transformers.models.qwen2_vl.modeling_qwen2_vl": _derive_mm_token_type_ids}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _PATCHES.get(name)
        if patch is None:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def patched(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _PatchOnImport())
