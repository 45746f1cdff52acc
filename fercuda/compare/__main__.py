"""fercuda against its peers, on built-in inputs: ``python -m fercuda.compare`` (``make compare``).

Prints the environment (fercuda.compare.environment) and one table: for each case, how fercuda's
output agrees with its reference (differing pixels against OpenCV for Canny, the largest error
against float64 PyTorch for the fused block), the median time of fercuda and of each peer, and
fercuda's speed-up over each. Sections are functions that return Rows (SECTIONS); a new kernel
family adds its own section module beside canny.py and dwconv.py.

Environment: FERCUDA_FER2013 (folder holding FER2013's train/ and test/; default
fercuda.data.default_fer2013_root()), FERCUDA_COMPARE_THREADS (threads for torch and cv2 alike;
default torch's).
"""

import os

import cv2
import torch

from fercuda.compare import disagreeing, format_table
from fercuda.compare.canny import canny_section
from fercuda.compare.dwconv import dwconv_section
from fercuda.compare.environment import describe, environment

SECTIONS = [canny_section, dwconv_section]


def main():
    threads = int(os.environ.get("FERCUDA_COMPARE_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    print(f"fercuda compare, {threads} threads for torch and cv2 alike: {describe(environment())}")
    rows = [row for section in SECTIONS for row in section()]
    print(format_table(rows))
    print("kornia: timed on 8 images or a 1/64 crop and scaled by pixel count (an estimate).")
    if disagreeing(rows):
        raise SystemExit("fercuda compare: some outputs differ from their reference")


if __name__ == "__main__":
    main()
