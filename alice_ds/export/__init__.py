"""`alice-ds convert`: ZeRO checkpoint -> MONAI `SwinUNETR` weights; `load_pretrained` for users.

Two output layouts:

- `--format monai` (default): the full `SwinUNETR(in_channels=1, out_channels=1, feature_size=F,
  use_v2=...)` state dict (`swinViT.*`, `encoder*`, `decoder*`, `out.*` = the 1-channel
  reconstruction head of pretraining), fp32 safetensors, plus the sidecar `W.json` (feature_size,
  use_v2, spacing, intensity window, roi, step, source checkpoint, teacher/student, version).
  `alice_ds.load_pretrained(model, "W.safetensors")` loads it into any `SwinUNETR`.
- `--format monai-load-from`: the Swin encoder only, in the layout of Tang et al.'s
  `model_swinvit.pt` that `SwinUNETR.load_from()` and public fine-tuning scripts read: `module.`
  instead of `swinViT.`, `mlp.fc1`/`mlp.fc2` instead of MONAI's `mlp.linear1`/`mlp.linear2`.
  `W.safetensors` (default) holds those flat keys; use it with
  `model.load_from({"state_dict": safetensors.torch.load_file(path)})`. Safetensors cannot hold the
  `{"state_dict": ...}` wrapper that `torch.load(path)["state_dict"]` scripts index, so an output
  name ending in `.pt`/`.pth` writes that wrapper with `torch.save`: a zip of tensors and plain
  dicts that loads with `torch.load(..., weights_only=True)` (torch's default since 2.6) and runs no
  code. Choose it only for scripts you cannot change.

The writer streams: tensors are read from the checkpoint and written to disk one at a time, so
peak memory is one tensor plus what DeepSpeed's `zero_to_fp32` holds for the student (ZeRO 1-2:
one concatenated fp32 copy of the trainable parameters).

Modules: `keys` (MONAI <-> `load_from` names), `safetensors_stream` (the streaming writer), `convert`
(`convert`, `verify` and the `alice-ds convert` command), `load` (`load_pretrained`). Checkpoints
are read through `alice_ds.engine.export_zero`, the only part that touches DeepSpeed.
"""

from __future__ import annotations

from alice_ds.export.converter import ExportResult, convert, verify
from alice_ds.export.keys import from_load_from_key, to_load_from_key
from alice_ds.export.load import LoadReport, load_pretrained
from alice_ds.export.safetensors_stream import write_safetensors

__all__ = ["convert", "load_pretrained", "LoadReport", "ExportResult", "verify", "to_load_from_key",
           "from_load_from_key", "write_safetensors"]
