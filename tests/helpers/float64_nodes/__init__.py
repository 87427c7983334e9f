"""A test-only custom node for whole-workflow references: Load Checkpoint with the diffusion model in
float64 (ComfyUI's own loader, its ``dtype`` model option), so a server workflow can be run as the
float64 reference of tests/helpers/numerics.py. The test servers load it from here; never shipped."""
import comfy.sd
import folder_paths
import torch


class CheckpointLoaderFloat64:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ckpt_name": (folder_paths.get_filename_list("checkpoints"),)}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, ckpt_name):
        path = folder_paths.get_full_path_or_raise("checkpoints", ckpt_name)
        out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True,
                                                    embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                    model_options={"dtype": torch.float64})
        return out[:3]


NODE_CLASS_MAPPINGS = {"LTXAVTestCheckpointLoaderFloat64": CheckpointLoaderFloat64}
