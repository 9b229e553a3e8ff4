"""Image benchmark: the memory of members' huge pictures, and the cost of checking a result image.

    python -m bench.images                 # both parts (about 15 s)
    python -m bench.images --part remix    # peak memory of 4 remixes of a 6320x6320 PNG at once
    python -m bench.images --part check    # what checking one downloaded result image costs

**remix.** A 6320x6320 PNG (just under the 40-megapixel cap, a few hundred kB: a small file can claim a huge canvas)
is normalised four times at once, as four members' /remix would: each call goes through the bot's own path
(`normalise_input_in_turn`, which `PayloadBuilder.prepare_input` awaits). It runs in a child process of its
own that only reads the file and normalises it, so its peak resident size (`VmHWM` from /proc) is this work's
alone: the parent renders the picture. The child's loop also runs a stall monitor (sleep 5 ms, note the overshoot).
Target: peak < 300 MB.

**check.** `read_image` (what `ImageDownloader.download` runs on every result image) on a 512x512 photo-like
image of each format, median CPU time of many calls; and what handing `fit_to_limit` to a thread costs when the
images already fit (`fits()` lets the caller skip it).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/images.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))

from PIL import Image, ImageDraw  # noqa: E402

REMIX_SIDE = 6320  # 39.9 megapixels: just under bot.images.processing.MAX_INPUT_PIXELS
REMIXES_AT_ONCE = 4
PEAK_TARGET_MB = 300.0


def render_huge_png(path: Path) -> int:
    """A 6320x6320 RGB picture of a few shapes: a PNG of a few hundred kB that decodes to 160 MB in Pillow."""
    picture = Image.new("RGB", (REMIX_SIDE, REMIX_SIDE), (240, 235, 220))
    draw = ImageDraw.Draw(picture)
    for step in range(0, REMIX_SIDE, 800):
        draw.ellipse((step, step // 2, step + 1200, step // 2 + 900), fill=(30 + step % 200, 90, 160))
    picture.save(path, "PNG", optimize=True)
    return path.stat().st_size


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


async def remix_child(data: bytes) -> dict[str, float]:
    """In the child: normalise the picture REMIXES_AT_ONCE times at once, as the bot does."""
    from bot import imaging

    normalise = getattr(imaging, "normalise_input_in_turn", None)
    if normalise is None:  # the bot before the bounded decoder: each call in its own thread
        normalise = lambda data: asyncio.to_thread(imaging.normalise_input, data)  # noqa: E731
    stalls: list[float] = []

    async def monitor() -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.005)
            stalls.append(time.monotonic() - before - 0.005)

    baseline = status_mb("VmRSS")
    watcher = asyncio.create_task(monitor())
    started = time.monotonic()
    results = await asyncio.gather(*(normalise(data) for _ in range(REMIXES_AT_ONCE)))
    elapsed = time.monotonic() - started
    watcher.cancel()
    return {
        "baseline_mb": baseline,
        "peak_mb": status_mb("VmHWM"),
        "seconds": elapsed,
        "largest_stall_ms": max(stalls, default=0.0) * 1000,
        "width": results[0].width,
        "height": results[0].height,
    }


def part_remix() -> bool:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "huge.png"
        size = render_huge_png(path)
        child = subprocess.run(
            [sys.executable, "-m", "bench.images", "--child", str(path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    found = json.loads(child.stdout.strip().splitlines()[-1])
    passed = found["peak_mb"] < PEAK_TARGET_MB
    print(
        f"remix: {REMIXES_AT_ONCE} x a {REMIX_SIDE}x{REMIX_SIDE} PNG of {size // 1000} kB at once -> "
        f"{found['width']}x{found['height']} each, in {found['seconds']:.2f} s; "
        f"resident {found['baseline_mb']:.0f} MB before, peak {found['peak_mb']:.0f} MB "
        f"(target < {PEAK_TARGET_MB:.0f} MB: {'PASS' if passed else 'FAIL'}); "
        f"largest loop stall {found['largest_stall_ms']:.0f} ms"
    )
    return passed


def photo(size: tuple[int, int]) -> Image.Image:
    from bench.run import Images

    with Image.open(io.BytesIO(Images._render(size, "photo"))) as opened:
        return opened.convert("RGB")


def cpu_ms(call: Callable[[], object], runs: int) -> float:
    samples = []
    for _ in range(runs):
        started = time.process_time()
        call()
        samples.append(time.process_time() - started)
    return statistics.median(samples) * 1000


def part_check(runs: int) -> None:
    from bot.images.processing import fit_to_limit, fits, read_image

    picture = photo((512, 512))
    encoded = {}
    for fmt, options in (("PNG", {}), ("JPEG", {"quality": 92}), ("WEBP", {"quality": 90})):
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        encoded[fmt] = buffer.getvalue()
    cells = [
        f"{fmt} {len(data) // 1000} kB: {cpu_ms(lambda data=data: read_image(data), runs):.2f} ms"
        for fmt, data in encoded.items()
    ]
    print(f"check: read_image of a 512x512 result, CPU per image (median of {runs}): " + "; ".join(cells))
    images = [read_image(encoded["PNG"])] * 4
    limit = 10 * 1024 * 1024

    async def hops() -> None:
        for _ in range(runs):
            await asyncio.to_thread(fit_to_limit, images, limit)

    started = time.process_time()
    asyncio.run(hops())
    hop = (time.process_time() - started) / runs * 1000
    started = time.process_time()
    for _ in range(runs):
        fits(images, limit)
    inline = (time.process_time() - started) / runs * 1000
    print(
        f"check: 4 images that fit Discord's limit, CPU per job: fit_to_limit in a thread {hop:.3f} ms, "
        f"fits() on the loop {inline:.4f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("remix", "check", "all"), default="all")
    parser.add_argument("--runs", type=int, default=200, help="calls per measure of the check part")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.child:
        print(json.dumps(asyncio.run(remix_child(Path(options.child).read_bytes()))))
        return 0
    print(f"load average {os.getloadavg()[0]:.2f}")
    passed = True
    if options.part in ("remix", "all"):
        passed = part_remix()
    if options.part in ("check", "all"):
        part_check(options.runs)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
