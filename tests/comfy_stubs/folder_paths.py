"""Stub of ComfyUI's `folder_paths`: model folders and the output directory.

`_configure(base)` (a test helper) lays out ComfyUI's defaults under `base`: `base/models/<folder>` and
`base/output`, with `diffusion_models` = [unet, diffusion_models] and `text_encoders` = [text_encoders, clip].
"""
import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths = {}
models_dir = None
output_directory = None


def _configure(base):
    global models_dir, output_directory
    base = os.fspath(base)
    models_dir = os.path.join(base, "models")
    output_directory = os.path.join(base, "output")
    folder_names_and_paths.clear()
    for name, subs in {"diffusion_models": ("unet", "diffusion_models"), "text_encoders": ("text_encoders", "clip"),
                       "vae": ("vae",), "loras": ("loras",)}.items():
        folder_names_and_paths[name] = ([os.path.join(models_dir, s) for s in subs], supported_pt_extensions)
        for s in subs:
            os.makedirs(os.path.join(models_dir, s), exist_ok=True)
    os.makedirs(output_directory, exist_ok=True)


def map_legacy(folder_name):
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def add_model_folder_path(folder_name, full_folder_path, is_default=False):
    """What extra_model_paths.yaml entries go through: one more folder for a kind (first when is_default)."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name):
    return folder_names_and_paths[map_legacy(folder_name)][0][:]


def get_output_directory():
    return output_directory


def get_full_path(folder_name, filename):
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for folder in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(folder, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_full_path_or_raise(folder_name, filename):
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def get_filename_list(folder_name):
    folders, extensions = folder_names_and_paths[map_legacy(folder_name)]
    names = set()
    for folder in folders:
        for dirpath, _, filenames in os.walk(folder, followlinks=True):
            for f in filenames:
                if not extensions or os.path.splitext(f)[1].lower() in extensions:
                    names.add(os.path.relpath(os.path.join(dirpath, f), folder))
    return sorted(names)
