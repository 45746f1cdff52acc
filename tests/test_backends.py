"""fercuda.ops' backend= argument: every backend computes the same result (the Canny family's
backends, and the refusal of a backend that cannot run the given tensor: tests/test_canny.py)."""

