"""ocr-patch's runtime guard: patches DeepSeek-OCR's remote code at the moment Python first
opens it, so `from_pretrained(..., trust_remote_code=True)` on a cold cache never imports an
unpatched file. Installed by `ocr-patch hook install` (a `.pth` file that calls
`ocr_patch.hook.install()` at interpreter start). See `ocr_patch.hook`.
"""
__all__ = ["install", "uninstall", "active"]

from .hook import active, install, uninstall  # noqa: E402
