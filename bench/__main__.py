"""``python -m bench``: run the benchmark (``make bench``)."""

from bench.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
