"""Reference preprocessing from DeepSeek-OCR's own `infer()`, for tests/preprocess_ref.rs.

Usage: make_ref.py UPSTREAM_DIR OUT_DIR

UPSTREAM_DIR holds the Hub's modeling_deepseekocr.py and its siblings (never committed here).
We write test images (PNG, lossless, plus one JPEG) into OUT_DIR/images, then run the real
`DeepseekOCRForCausalLM.infer()` on each image in each mode with a stand-in `self` whose
`generate` records its inputs and stops the run; `BasicImageTransform` is wrapped to record the
PIL views it is given (uint8) and what it returns (float32, before infer()'s bf16 cast).
The tokenizer is a stand-in (one id per UTF-8 byte, 1000 + byte): the layout, not the
vocabulary, is under test. Also recorded: the `target_ratios` list `dynamic_preprocess` passes
to `find_closest_aspect_ratio` (captured, not recomputed) and that function's choice for many
sizes, ties included.

Run with transformers 4.46.3 and torch (CPU).
"""

import atexit
import importlib
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

torch.Tensor.cuda = lambda self, *a, **k: self  # everything stays on the CPU

MODES = {
    "tiny": (512, 512, False),
    "small": (640, 640, False),
    "base": (1024, 1024, False),
    "large": (1280, 1280, False),
    "gundam": (1024, 640, True),
}
PROMPTS = {
    "grounding": "<image>\n<|grounding|>Convert the document to markdown. ",
    "free": "  <image>\nFree OCR. ",
}


def import_ocr(upstream):
    root = tempfile.mkdtemp(prefix="ocr_pre_ref_")
    atexit.register(shutil.rmtree, root, True)
    pkg = os.path.join(root, "ocr_upstream")
    os.mkdir(pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    for f in os.listdir(upstream):
        if f.endswith(".py"):
            os.symlink(os.path.join(os.path.abspath(upstream), f), os.path.join(pkg, f))
    sys.path.insert(0, root)
    return importlib.import_module("ocr_upstream.modeling_deepseekocr")


def pattern(w, h, seed):
    """A busy but smooth-ish RGB pattern plus noise: exercises every resampling weight."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 7 + y * 3) % 256
    g = (np.sin(x / 17.0) * 100 + np.cos(y / 11.0) * 100 + 128) % 256
    b = ((x ^ y) * 5) % 256
    img = np.stack([r, g, b], -1).astype(np.int32) + rng.integers(-20, 21, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(dir):
    os.makedirs(dir, exist_ok=True)
    out = {}
    sizes = [
        (300, 200), (640, 640), (641, 100), (1500, 1000), (800, 3000), (3000, 700),
        (1000, 1000), (1250, 500), (37, 1900), (2048, 1536), (5, 3),
    ]
    for i, (w, h) in enumerate(sizes):
        name = f"rgb_{w}x{h}.png"
        Image.fromarray(pattern(w, h, i)).save(os.path.join(dir, name))
        out[name] = (w, h)
    a = pattern(900, 700, 50)
    alpha = (np.arange(900)[None, :].repeat(700, 0) % 256).astype(np.uint8)
    Image.fromarray(np.dstack([a, alpha]), "RGBA").save(os.path.join(dir, "rgba_900x700.png"))
    Image.fromarray(pattern(700, 900, 51)[:, :, 1], "L").save(os.path.join(dir, "gray_700x900.png"))
    Image.fromarray(pattern(1300, 700, 52)).convert("P", palette=Image.ADAPTIVE).save(os.path.join(dir, "palette_1300x700.png"))
    # EXIF orientation 6 (rotate 90 CW to display): stored 1200x500, shown 500x1200.
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pattern(1200, 500, 53)).save(os.path.join(dir, "exif6_1200x500.png"), exif=exif)
    exif[0x0112] = 3
    Image.fromarray(pattern(1000, 900, 54)).save(os.path.join(dir, "exif3_1000x900.png"), exif=exif)
    Image.fromarray(pattern(1100, 800, 55)).save(os.path.join(dir, "photo_1100x800.jpg"), quality=90)
    return sorted(os.listdir(dir))


class Stop(Exception):
    pass


def run_infer(ocr, path, mode, prompt):
    base_size, image_size, crop_mode = MODES[mode]
    seen = []

    class Recording(ocr.BasicImageTransform):
        def __call__(self, x):
            y = super().__call__(x)
            seen.append((np.asarray(x.convert("RGB"), dtype=np.uint8).copy(), y.detach().clone()))
            return y

    captured = {}

    class FakeSelf:
        def disable_torch_init(self):
            pass

        def generate(self, input_ids, **kw):
            captured["input_ids"] = input_ids
            captured.update(kw)
            raise Stop()

    class Tok:
        eos_token_id = 1

        def encode(self, text, add_special_tokens=False):
            assert add_special_tokens is False
            return [1000 + b for b in text.encode("utf-8")]

    old = ocr.BasicImageTransform
    ocr.BasicImageTransform = Recording
    out_dir = tempfile.mkdtemp(prefix="ocr_pre_out_")
    try:
        ocr.DeepseekOCRForCausalLM.infer(
            FakeSelf(), Tok(), prompt=prompt, image_file=path, output_path=out_dir,
            base_size=base_size, image_size=image_size, crop_mode=crop_mode, eval_mode=True,
        )
        raise RuntimeError("infer() did not call generate")
    except Stop:
        pass
    finally:
        ocr.BasicImageTransform = old
        shutil.rmtree(out_dir, True)
    return seen, captured


def main():
    upstream, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    ocr = import_ocr(upstream)
    img_dir = os.path.join(out, "images")
    names = write_images(img_dir)

    index = {"cases": []}
    for name in names:
        for mode in MODES:
            for pname, prompt in PROMPTS.items():
                if pname == "free" and mode not in ("tiny", "gundam"):
                    continue
                seen, cap = run_infer(ocr, os.path.join(img_dir, name), mode, prompt)
                crops, ori = cap["images"][0]
                t = {
                    "input_ids": cap["input_ids"][0].to(torch.int64).contiguous(),
                    "images_seq_mask": cap["images_seq_mask"][0].to(torch.uint8).contiguous(),
                    "images_spatial_crop": cap["images_spatial_crop"].to(torch.int64).contiguous(),
                    "bf16.global": ori[0].contiguous(),
                    "bf16.crops": crops.contiguous(),
                    "u8.global": torch.from_numpy(seen[0][0]),
                    "f32.global": seen[0][1].contiguous(),
                }
                if len(seen) > 1:
                    t["u8.tiles"] = torch.from_numpy(np.stack([s[0] for s in seen[1:]]))
                    t["f32.tiles"] = torch.stack([s[1] for s in seen[1:]]).contiguous()
                case = f"{name}.{mode}.{pname}"
                save_file(t, os.path.join(out, case + ".safetensors"))
                index["cases"].append({"case": case, "image": name, "mode": mode, "prompt": prompt})
                print(case, list(t["u8.global"].shape), cap["images_spatial_crop"].tolist(),
                      t["input_ids"].shape[0])

    # The candidate grids, as dynamic_preprocess hands them over, and choices incl. ties.
    grabbed = {}
    real = ocr.find_closest_aspect_ratio

    def spy(aspect_ratio, target_ratios, width, height, image_size):
        grabbed["target_ratios"] = [list(r) for r in target_ratios]
        return real(aspect_ratio, target_ratios, width, height, image_size)

    ocr.find_closest_aspect_ratio = spy
    ocr.dynamic_preprocess(Image.new("RGB", (700, 700)))
    ocr.find_closest_aspect_ratio = real
    ratios = [tuple(r) for r in grabbed["target_ratios"]]
    rng = np.random.default_rng(7)
    sizes = [(int(w), int(h)) for w, h in rng.integers(1, 5000, (3000, 2))]
    # exact ties: aspect midway between candidates (2.5 between 2 and 3, 1.25, 0.75, 5/3 ...)
    for (a, b) in [(5, 2), (2, 5), (5, 4), (4, 5), (3, 4), (4, 3), (3, 2), (2, 3), (7, 2), (2, 7),
                   (9, 2), (2, 9), (11, 2), (13, 2), (15, 2), (17, 2), (1, 1), (5, 3), (7, 4)]:
        for k in (1, 3, 64, 100, 200, 256, 300, 400, 640, 1000):
            sizes.append((a * k, b * k))
    choices = [[w, h, list(real(w / h, ratios, w, h, 640))] for (w, h) in sizes]
    index["target_ratios"] = grabbed["target_ratios"]
    index["choices"] = choices
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump(index, f)
    print(f"{len(index['cases'])} cases, {len(choices)} aspect-ratio choices")


if __name__ == "__main__":
    main()
