"""Dev node ComfyUI stand-in: the node classes the SONIC workflow names, and prompt validation.

The signatures (input names, types, ranges, choices, required/optional, return types) follow the public
sources of ComfyUI (nodes.py, comfy_extras), cubiq/ComfyUI_essentials (ImageResize+),
smthemex/ComfyUI_Sonic and Kosinkadink/ComfyUI-VideoHelperSuite, as docs/node-protocols.md (ComfyUI and
SONIC) lists them; the validation answers (error types, messages, node_errors) follow ComfyUI's
execution.py.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devnode.comfy_state import Workload, _upload_path

MAX_RESOLUTION = 16384

# --- node classes ---------------------------------------------------------------------------
# Input spec: (type, options). type is a ComfyUI type name ("INT", "IMAGE", ...) or a list of allowed
# values; options may hold min/max. NodeDef.link_types names the inputs that also take links of other
# types (VHS's MultiInput: /object_info shows its first type, a widget value is converted to it).
# "UPLOAD" marks LoadImage/LoadAudio file names; "MODEL_FILES" a choice of the files in a model folder
# (options: folder, and fixed choices listed first), read at validation time like folder_paths does.

_INTERPOLATIONS = ["nearest", "bilinear", "bicubic", "area", "nearest-exact", "lanczos"]
_RESIZE_METHODS = ["stretch", "keep proportion", "fill / crop", "pad"]
_RESIZE_CONDITIONS = [
    "always",
    "downscale if bigger",
    "upscale if smaller",
    "if bigger area",
    "if smaller area",
]
# VideoCombine's formats: image/gif and image/webp, then "video/" + each of VHS's video_formats/*.json
# (13 files; gifski only where the gifski binary is, which a node lacks). The real order is the folder's.
_VHS_FORMATS = [
    "image/gif",
    "image/webp",
    "video/16bit-png",
    "video/8bit-png",
    "video/ProRes",
    "video/av1-webm",
    "video/ffmpeg-gif",
    "video/ffv1-mkv",
    "video/h264-mp4",
    "video/h265-mp4",
    "video/nvenc_av1-mp4",
    "video/nvenc_h264-mp4",
    "video/nvenc_hevc-mp4",
    "video/webm",
]
# The model files a media:fast node carries, created as empty placeholders in the dev node's model
# folders (the dev node renders without them); the choices come from the folders, as on a real node.
# models/sonic holds what ComfyUI_Sonic's README lists; its folder has no extension filter, so every file
# under it (subfolders too) is a sonic_unet choice.
MODEL_FILES = {
    "checkpoints": ("svd_xt.safetensors",),
    "sonic": (
        "audio2bucket.pth",
        "audio2token.pth",
        "unet.pth",
        "yoloface_v5m.pt",
        "whisper-tiny/config.json",
        "whisper-tiny/model.safetensors",
        "whisper-tiny/preprocessor_config.json",
        "RIFE/flownet.pkl",
    ),
}


@dataclass(frozen=True)
class NodeDef:
    required: dict[str, tuple[Any, dict]]
    returns: tuple[str, ...]
    optional: dict[str, tuple[Any, dict]] = field(default_factory=dict)
    output_node: bool = False
    link_types: dict[str, tuple[str, ...]] = field(default_factory=dict)  # input -> every type it links to


NODE_DEFS: dict[str, NodeDef] = {
    "LoadImage": NodeDef({"image": ("UPLOAD", {"kind": "image"})}, ("IMAGE", "MASK")),
    "LoadAudio": NodeDef({"audio": ("UPLOAD", {"kind": "audio"})}, ("AUDIO",)),
    "ImageResize+": NodeDef(
        {
            "image": ("IMAGE", {}),
            "width": ("INT", {"min": 0, "max": MAX_RESOLUTION}),
            "height": ("INT", {"min": 0, "max": MAX_RESOLUTION}),
            "interpolation": (_INTERPOLATIONS, {}),
            "method": (_RESIZE_METHODS, {}),
            "condition": (_RESIZE_CONDITIONS, {}),
            "multiple_of": ("INT", {"min": 0, "max": 512}),
        },
        ("IMAGE", "INT", "INT"),
    ),
    "ImageOnlyCheckpointLoader": NodeDef(
        {"ckpt_name": ("MODEL_FILES", {"folder": "checkpoints"})}, ("MODEL", "CLIP_VISION", "VAE")
    ),
    "SONICTLoader": NodeDef(
        {
            "model": ("MODEL", {}),
            "sonic_unet": ("MODEL_FILES", {"folder": "sonic", "fixed": ["none"]}),
            "ip_audio_scale": ("FLOAT", {"min": 0.5, "max": 2.0}),
            "use_interframe": ("BOOLEAN", {}),
            "dtype": (["fp16", "fp32", "bf16"], {}),
        },
        ("MODEL_SONIC", "DTYPE"),
    ),
    "SONIC_PreData": NodeDef(
        {
            "clip_vision": ("CLIP_VISION", {}),
            "vae": ("VAE", {}),
            "audio": ("AUDIO", {}),
            "image": ("IMAGE", {}),
            "weight_dtype": ("DTYPE", {}),
            "min_resolution": ("INT", {"min": 128, "max": 2048}),
            "duration": ("FLOAT", {"min": 1.0, "max": 100000000000.0}),
            "expand_ratio": ("FLOAT", {"min": 0.1, "max": 1.0}),
        },
        ("SONIC_PREDATA",),
    ),
    "SONICSampler": NodeDef(
        {
            "model": ("MODEL_SONIC", {}),
            "data_dict": ("SONIC_PREDATA", {}),
            "seed": ("INT", {"min": 0, "max": 2**31 - 1}),
            "inference_steps": ("INT", {"min": 1, "max": 1024}),
            "dynamic_scale": ("FLOAT", {"min": 0.5, "max": 2.0}),
            "fps": ("FLOAT", {"min": 5.0, "max": 120.0}),
        },
        ("IMAGE", "FLOAT"),
    ),
    # pix_fmt, crf, trim_to_audio, save_metadata are the format's extra widgets: not declared, so
    # ComfyUI passes them through unvalidated (the runner reads them).
    "VHS_VideoCombine": NodeDef(
        {
            "images": ("IMAGE", {}),
            "frame_rate": ("FLOAT", {"min": 1}),
            "loop_count": ("INT", {"min": 0, "max": 100}),
            "filename_prefix": ("STRING", {}),
            "format": (_VHS_FORMATS, {}),
            "pingpong": ("BOOLEAN", {}),
            "save_output": ("BOOLEAN", {}),
        },
        ("VHS_FILENAMES",),
        optional={"audio": ("AUDIO", {}), "meta_batch": ("VHS_BatchManager", {}), "vae": ("VAE", {})},
        output_node=True,
        link_types={"frame_rate": ("FLOAT", "INT")},
    ),
    "PreviewImage": NodeDef({"images": ("IMAGE", {})}, (), output_node=True),
}



def model_choices(wl: Workload, opts: dict) -> list[str]:
    """The choices of a model-file input: its fixed ones, then every file under its model folder as a
    relative path, sorted (folder_paths.get_filename_list searches the folder recursively)."""
    folder = wl.models / opts["folder"]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return list(opts.get("fixed", [])) + files


def create_model_files(models: Path) -> None:
    """The model folders of a media:fast node with empty placeholder files (see MODEL_FILES)."""
    for folder, names in MODEL_FILES.items():
        for name in names:
            (models / folder / name).parent.mkdir(parents=True, exist_ok=True)
            (models / folder / name).touch(exist_ok=True)


def _node_error(kind: str, message: str, details: str, **extra: Any) -> dict:
    return {"type": kind, "message": message, "details": details, "extra_info": extra}


def _convert(type_name: str, value: Any) -> Any:
    if type_name == "INT":
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"{value!r} is not an integer")
        return int(value)
    if type_name == "FLOAT":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number")
        return float(value)
    if type_name == "BOOLEAN":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"{value!r} is not a boolean")
    if type_name == "STRING":
        return str(value)
    return value


def _input_error(kind: str, message: str, details: str, name: str, config: Any, value: Any, **extra: Any) -> dict:
    """A widget value's error, with the input's name, config and the value received (ComfyUI's order)."""
    return _node_error(kind, message, details, input_name=name, input_config=config, received_value=value, **extra)


def _check_value(wl: Workload, name: str, spec: tuple[Any, dict], value: Any) -> tuple[Any, dict | None]:
    """Validate one widget value; return (converted value, error or None)."""
    type_input, opts = spec
    if type_input == "MODEL_FILES":
        type_input = model_choices(wl, opts)
    config = [type_input if not isinstance(type_input, list) else list(type_input), opts]
    if type_input == "UPLOAD":
        if _upload_path(wl, value) is None:
            what = "image" if opts.get("kind") == "image" else "audio"
            return value, _input_error("custom_validation_failed", "Custom validation failed for node",
                                       f"{name} - Invalid {what} file: {value}", name, None, value)
        return value, None
    if isinstance(type_input, list):
        if value not in type_input:
            return value, _input_error("value_not_in_list", "Value not in list",
                                       f"{name}: '{value}' not in {type_input}", name, config, value)
        return value, None
    if type_input in ("INT", "FLOAT", "BOOLEAN", "STRING"):
        return _check_primitive(name, type_input, opts, config, value)
    # A link type (IMAGE, AUDIO, ...) given as a plain value.
    return value, _input_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, "
                               "slot_index]", name, name, config, value)


def _check_primitive(name: str, type_name: str, opts: dict, config: list, value: Any) -> tuple[Any, dict | None]:
    """An INT, FLOAT, BOOLEAN or STRING value: converted, then held to its min and max."""
    try:
        value = _convert(type_name, value)
    except (TypeError, ValueError) as exc:
        return value, _input_error("invalid_input_type", f"Failed to convert an input value to a {type_name} value",
                                   f"{name}, {value}, {exc}", name, config, value, exception_message=str(exc))
    if "min" in opts and value < opts["min"]:
        return value, _input_error("value_smaller_than_min", f"Value {value} smaller than min of {opts['min']}",
                                   name, name, config, value)
    if "max" in opts and value > opts["max"]:
        return value, _input_error("value_bigger_than_max", f"Value {value} bigger than max of {opts['max']}",
                                   name, name, config, value)
    return value, None


def _validate_node(wl: Workload, prompt: dict, node_id: str, memo: dict[str, tuple[bool, list]]) -> bool:
    """Validate node `node_id` and everything it links to; results go to `memo` (id -> (ok, errors))."""
    if node_id in memo:
        return memo[node_id][0]
    memo[node_id] = (True, [])  # guards against cycles while recursing
    node = prompt[node_id]
    definition = NODE_DEFS[node["class_type"]]
    inputs = node.get("inputs") or {}
    errors: list[dict] = []
    upstream_ok = True
    specs = {**definition.required, **definition.optional}
    for name, spec in specs.items():
        if name not in inputs:
            if name in definition.required:
                errors.append(
                    _node_error("required_input_missing", "Required input is missing", name, input_name=name)
                )
            continue
        value = inputs[name]
        if isinstance(value, list):
            error = _link_error(prompt, name, spec, value, definition.link_types.get(name, (spec[0],)))
            if error is not None:
                errors.append(error)
            elif not _validate_node(wl, prompt, str(value[0]), memo):
                upstream_ok = False
            continue
        converted, error = _check_value(wl, name, spec, value)
        if error is not None:
            errors.append(error)
        else:
            inputs[name] = converted
    memo[node_id] = (not errors and upstream_ok, errors)
    return memo[node_id][0]


def _link_error(prompt: dict, name: str, spec: tuple[Any, dict], value: list, accepted: tuple[str, ...]) -> dict | None:
    """What is wrong with input `name` linked as `value` ([node_id, slot]), or None: the link's shape,
    the node it names, the slot and the type of what that slot returns (one of `accepted`)."""
    if len(value) != 2 or not isinstance(value[1], int) or isinstance(value[1], bool):
        return _node_error("bad_linked_input", "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                           name, input_name=name, received_value=value)
    source_id, slot = str(value[0]), value[1]
    source = prompt.get(source_id)
    if source is None:  # ComfyUI hits a KeyError looking the node up and reports that
        return _node_error("exception_during_inner_validation", "Exception when validating inner node",
                           repr(source_id), input_name=name, input_config=[spec[0], spec[1]],
                           exception_message=repr(source_id), exception_type="KeyError", traceback=[],
                           linked_node=value)
    returns = NODE_DEFS[source["class_type"]].returns
    if not 0 <= slot < len(returns):
        return _node_error("bad_linked_input", f"Linked output index {slot} out of range for {source['class_type']}",
                           f"{name}, {source['class_type']} has {len(returns)} outputs", input_name=name,
                           linked_node=value)
    if returns[slot] not in accepted:
        return _node_error("return_type_mismatch", "Return type mismatch between linked nodes",
                           f"{name}, received_type({returns[slot]}) mismatch input_type({spec[0]})",
                           input_name=name, received_type=returns[slot], linked_node=value)
    return None


def _invalid_prompt(message: str, details: str) -> tuple[dict, list, dict]:
    return _node_error("invalid_prompt", message, details), [], {}


def validate_prompt(wl: Workload, prompt: Any) -> tuple[dict | None, list[str], dict]:
    """ComfyUI-style validation: (error or None, output node ids to run, node_errors)."""
    if not isinstance(prompt, dict) or not prompt:
        return _invalid_prompt("Cannot execute because the prompt is not a non-empty object.", "")
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "class_type" not in node:
            return _invalid_prompt(
                "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'"
            )
        if node["class_type"] not in NODE_DEFS:
            return _invalid_prompt(
                f"Cannot execute because node {node['class_type']} does not exist.", f"Node ID '#{node_id}'"
            )
        if not isinstance(node.get("inputs", {}), dict):
            return _invalid_prompt(
                "Cannot execute because a node's inputs are not an object.", f"Node ID '#{node_id}'"
            )
    outputs = sorted(
        (nid for nid, n in prompt.items() if NODE_DEFS[n["class_type"]].output_node), key=_id_key
    )
    if not outputs:
        return _node_error("prompt_no_outputs", "Prompt has no outputs", ""), [], {}
    memo: dict[str, tuple[bool, list]] = {}
    good: list[str] = []
    node_errors: dict[str, dict] = {}
    lines: list[str] = []
    for out in outputs:
        if _validate_node(wl, prompt, out, memo):
            good.append(out)
            continue
        for node_id in _upstream(prompt, out):
            ok, reasons = memo.get(node_id, (True, []))
            if ok or not reasons:
                continue
            entry = node_errors.setdefault(
                node_id,
                {"errors": reasons, "dependent_outputs": [], "class_type": prompt[node_id]["class_type"]},
            )
            entry["dependent_outputs"].append(out)
            lines.extend(f"{r['message']}: {r['details']}" for r in reasons)
    if not good:
        error = _node_error(
            "prompt_outputs_failed_validation", "Prompt outputs failed validation", "\n".join(lines)
        )
        return error, [], node_errors
    return None, good, node_errors


def _id_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (sys.maxsize, node_id)


def _upstream(prompt: dict, node_id: str) -> list[str]:
    """`node_id` and every node it depends on (existing ones only), in dependency order."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(nid: str) -> None:
        if nid in seen or nid not in prompt:
            return
        seen.add(nid)
        for value in (prompt[nid].get("inputs") or {}).values():
            if isinstance(value, list) and len(value) == 2:
                visit(str(value[0]))
        order.append(nid)

    visit(node_id)
    return order


def _execution_order(prompt: dict, outputs: list[str]) -> list[str]:
    """Run the output with the fewest not-yet-run dependencies first, as ComfyUI does."""
    order: list[str] = []
    remaining = list(outputs)
    while remaining:
        remaining.sort(key=lambda o: (len([n for n in _upstream(prompt, o) if n not in order]), _id_key(o)))
        for nid in _upstream(prompt, remaining.pop(0)):
            if nid not in order:
                order.append(nid)
    return order



def _object_info(wl: Workload) -> dict:
    info = {}

    def shown(spec: tuple[Any, dict]) -> list:
        if spec[0] == "UPLOAD":
            return [[], spec[1]]
        if spec[0] == "MODEL_FILES":
            return [model_choices(wl, spec[1]), {}]
        return [spec[0], spec[1]]

    for name, definition in NODE_DEFS.items():

        def widgets(specs: dict) -> dict:
            return {k: shown(v) for k, v in specs.items()}

        info[name] = {
            "input": {"required": widgets(definition.required), "optional": widgets(definition.optional)},
            "output": list(definition.returns),
            "name": name,
            "display_name": name,
            "output_node": definition.output_node,
        }
    return info

