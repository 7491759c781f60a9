#!/usr/bin/env python3
"""An image in a chat through the official `openai` Python client: an `image_url` content part holding a
data: URL of a small PNG that this script draws itself (standard library only: zlib and struct).

Start a server from the repository root (the README's first command; the tiny fixtures have a small
vision tower), then run this script:

    cargo run --release -- serve --model tests/fixtures/tiny-bf16
    pip install openai && python3 examples/images.py

Environment: OPENAI_BASE_URL [http://localhost:8000/v1], SWITCHYARD_MODEL (the first --served-model-name,
else --model as given) [tests/fixtures/tiny-bf16], OPENAI_API_KEY (for --api-key).
An https:// URL works the same way when the server may fetch it (see --allowed-media-domains).
"""

import base64
import os
import struct
import zlib

from openai import OpenAI


def png(width: int, height: int) -> bytes:
    """An 8-bit RGB PNG: a red-green gradient over a constant blue."""
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (255 * x // (width - 1), 255 * y // (height - 1), 96))
                    for y in range(height))  # filter byte 0 (none) before each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # bit depth 8, colour type 2 (RGB)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://localhost:8000/v1"),
                api_key=os.environ.get("OPENAI_API_KEY", "unused"))
model = os.environ.get("SWITCHYARD_MODEL", "tests/fixtures/tiny-bf16")
url = "data:image/png;base64," + base64.b64encode(png(96, 64)).decode()

r = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "Describe this image."}]}],
    max_tokens=48,
    temperature=0,
    # Soft tokens per image: 70, 140, 280 (the default), 560 or 1120.
    extra_body={"mm_processor_kwargs": {"max_soft_tokens": 140}},
)
print(r.choices[0].message.content)
print(f"prompt_tokens={r.usage.prompt_tokens} (the image's soft tokens included)")
