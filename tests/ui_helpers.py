"""A stand-in model for the web app's tests: the app's side is what they check, not a method."""

import threading
import time

import numpy as np

from diffsr.images import resize_picture


class StandIn:
    """A model that upscales by nearest neighbour and inverts the colours (so its output never equals the
    app's 'before' picture), and remembers its calls (and how many ran at once)."""

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds
        self.calls, self.running, self.most_at_once = [], 0, 0
        self.lock = threading.Lock()

    def load(self, method, **options):
        self.calls.append(("load", method, options["weights"]))
        return self

    def check_arguments(self, scale, seed, color_fix, knobs):
        return scale, seed, color_fix

    def upscale(self, picture, scale, seed, color_fix=None, callback=None, **knobs):
        from diffsr.progress import Step

        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(self.seconds)  # long enough for a second request to arrive while this one runs
        if callback is not None:  # progress as the real Upscaler.upscale reports it
            callback(Step("denoise", 1, 1))
        self.calls.append(("upscale", picture.name, scale, knobs))
        with self.lock:
            self.running -= 1
        width, height = picture.size
        result = resize_picture(picture, (round(width * scale), round(height * scale)), "nearest")
        inverted = np.iinfo(result.rgb.dtype).max - result.rgb
        return type(picture)(inverted, None, picture.name, picture.icc_profile, picture.exif)
