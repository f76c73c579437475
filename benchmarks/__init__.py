"""rust-daq's benchmark suite: ours beside the peers a user would pick instead, and beside the
physical limits, measured in one run on one machine. Run it with ``python -m benchmarks``
(``--help`` for the options); install the peers with ``pip install '.[bench]'``."""
