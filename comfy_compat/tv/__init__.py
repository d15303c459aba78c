"""The part of torchvision's API that ComfyUI packs use, made with torch, PIL and kornia, for a pack loaded where
torchvision is not importable (`comfy_compat.shims.torchvision` offers it under torchvision's names; a real
torchvision always wins). `functional` holds the operations, `geometry` the sampling-grid ones (rotate,
perspective, elastic), `transforms` the transform classes. Tensors are [..., C, H, W] (values 0..1 for floats);
PIL images go in and come out as PIL images."""
