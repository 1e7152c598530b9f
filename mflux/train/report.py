"""The loss plot written at the end of a run: a PNG drawn with PIL (no plotting dependency)."""

from pathlib import Path

from PIL import Image, ImageDraw

from mflux.train.files import atomic_png

W, H, PAD = 640, 360, 48


def plot_losses(rows: list[dict], path: Path) -> None:
    """Per-step loss (grey) and its running mean over ~5% of the steps (blue), step on x, loss on y."""
    if not rows:
        return
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    lo, hi = min(losses), max(losses)
    hi = hi if hi > lo else lo + 1
    x0, x1 = steps[0], max(steps[-1], steps[0] + 1)

    def xy(step, loss):
        return (
            PAD + (step - x0) / (x1 - x0) * (W - 2 * PAD),
            H - PAD - (loss - lo) / (hi - lo) * (H - 2 * PAD),
        )

    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle([PAD, PAD, W - PAD, H - PAD], outline="black")
    if len(rows) > 1:
        d.line([xy(s, v) for s, v in zip(steps, losses)], fill=(170, 170, 170), width=1)
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 90, 200), width=2)
    d.text((PAD, 12), f"training loss, steps {steps[0]}-{steps[-1]}", fill="black")
    d.text((4, PAD - 6), f"{hi:.3g}", fill="black")
    d.text((4, H - PAD - 6), f"{lo:.3g}", fill="black")
    d.text((PAD, H - PAD + 8), str(steps[0]), fill="black")
    d.text((W - PAD - 30, H - PAD + 8), str(steps[-1]), fill="black")
    atomic_png(path, im)
