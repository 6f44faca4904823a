"""The SONIC talking-head workflow in ComfyUI's API format (docs/node-protocols.md, ComfyUI and SONIC).

This module owns the graph comfyui.py queues: its nodes and their inputs (`build_sonic_workflow`), the
size the portrait is fitted to (`fit_size`), the video length asked of SONIC_PreData (`sonic_duration`)
and the id of the node that writes the video (`VIDEO_NODE`, VHS_VideoCombine). Pure data: no I/O.
"""

from __future__ import annotations

import math

FIT_W, FIT_H = 1280, 720  # the portrait is resized to fit this box inside the workflow
DURATION_MARGIN_S = 2  # SONIC_PreData duration = ceil(audio seconds) + this
VIDEO_NODE = "13"  # VHS_VideoCombine: writes the video, and the one node that reports progress


def fit_size(w: int, h: int, max_w: int = FIT_W, max_h: int = FIT_H) -> tuple[int, int]:
    """Scale (w, h) up or down to the largest size inside max_w x max_h, same aspect, even numbers."""
    if w <= 0 or h <= 0:
        raise ValueError(f"bad image size {w}x{h}")
    scale = min(max_w / w, max_h / h)
    fw = max(2, int(w * scale) // 2 * 2)
    fh = max(2, int(h * scale) // 2 * 2)
    return fw, fh


def sonic_duration(audio_seconds: float) -> int:
    return math.ceil(audio_seconds) + DURATION_MARGIN_S


def build_sonic_workflow(
    image_name: str,
    audio_name: str,
    image_size: tuple[int, int],
    audio_seconds: float,
    prefix: str,
    seed: int,
) -> dict:
    """The SONIC workflow in ComfyUI's API format (docs/node-protocols.md, ComfyUI and SONIC).
    image_size is the uploaded image's."""
    width, height = fit_size(*image_size)
    return {
        "18": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "26": {"class_type": "LoadAudio", "inputs": {"audio": audio_name}},
        "58": {
            "class_type": "ImageResize+",
            "inputs": {
                "image": ["18", 0],
                "width": width,
                "height": height,
                "interpolation": "nearest",
                "method": "stretch",
                "condition": "always",
                "multiple_of": 0,
            },
        },
        "32": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd_xt.safetensors"}},
        "34": {
            "class_type": "SONICTLoader",
            "inputs": {
                "model": ["32", 0],
                "sonic_unet": "unet.pth",
                "ip_audio_scale": 1,
                "use_interframe": True,
                "dtype": "bf16",
            },
        },
        "33": {
            "class_type": "SONIC_PreData",
            "inputs": {
                "clip_vision": ["32", 1],
                "vae": ["32", 2],
                "audio": ["26", 0],
                "image": ["58", 0],
                "weight_dtype": ["34", 1],
                "min_resolution": 576,
                "duration": sonic_duration(audio_seconds),
                "expand_ratio": 1,
            },
        },
        "31": {
            "class_type": "SONICSampler",
            "inputs": {
                "model": ["34", 0],
                "data_dict": ["33", 0],
                "seed": seed,
                "inference_steps": 25,
                "dynamic_scale": 1,
                "fps": 24,
            },
        },
        VIDEO_NODE: {
            "class_type": "VHS_VideoCombine",
            "inputs": {
                "images": ["31", 0],
                "frame_rate": ["31", 1],
                "audio": ["26", 0],
                # loop_count and pingpong are required inputs of VHS_VideoCombine
                "loop_count": 0,
                "pingpong": False,
                "format": "video/h264-mp4",
                "pix_fmt": "yuv420p",
                "crf": 19,
                "trim_to_audio": True,
                "save_output": True,
                "filename_prefix": prefix,
            },
        },
        "21": {"class_type": "PreviewImage", "inputs": {"images": ["58", 0]}},
    }
